"""Compile reports: the terminal summary and an HTML page with plots, from the report JSON alone (which
``arqc compile`` also stores in the ONNX model's metadata, so ``arqc report model.onnx`` rebuilds it)."""

from __future__ import annotations

import base64
import hashlib
import html
import io

import onnx

from arqc.base import ArqcError
from arqc.passes.lower import certified_bytes, read_metadata
from arqc.runtime.layerwise import format_layerwise

SUMMARY_RADII = ("0.00", "0.25", "0.50", "0.75", "1.00")  # keys of arqc.runtime.run results


def report_from_onnx(path: str) -> dict:
    """The report of an ONNX model arqc compiled, from its metadata alone: the compile report of a search, or
    for a fixed precision its policy; with the certificates the model carries (``certificates``) and whether
    they were computed on this file's bytes (``certified_file``)."""
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as err:  # onnx raises DecodeError, OSError, ...
        raise ArqcError(f"cannot read {path} as an ONNX model ({type(err).__name__}); check the path") from None
    meta = read_metadata(model, path)
    if "arqc.policy" not in meta:
        raise ArqcError(f"{path} carries no arqc metadata; it was not compiled by arqc")
    r = meta.get("arqc.report") or {"method": "fixed", "policy": meta["arqc.policy"]}
    certificates = {kind: meta[f"arqc.certificate_{kind}"] for kind in ("l2", "linf")
                    if f"arqc.certificate_{kind}" in meta}
    digest = hashlib.sha256(certified_bytes(model)).hexdigest()
    shas = [c.get("model_sha256") or c.get("backend_fingerprint") for c in certificates.values()]
    return {**r, "certificates": certificates, "certified_file": bool(shas) and all(s == digest for s in shas)}


def format_certificates(r: dict) -> str:
    """The certificates a compiled model carries (``r["certificates"]``), one block each."""
    certs = r.get("certificates") or {}
    if not certs:
        return "certificates: none (compile with --sigma and/or --epsilon and --test-data to add them)"
    lines = []
    if "l2" in certs:
        c = certs["l2"]
        radii = list(c["certified_accuracy"])
        lines += [f"L2 certificate (randomized smoothing, {c.get('runtime') or c['backend']}) on {c['num_images']} "
                  f"images of {c.get('data') or 'the test data'}: sigma={c['sigma']} n={c['n']} n0={c['n0']} "
                  f"alpha={c['alpha']} seed={c['seed']}",
                  "  radius              " + "".join(f"{x:>7}" for x in radii),
                  "  certified accuracy  " + "".join(f"{100 * c['certified_accuracy'][x]:>6.1f}%" for x in radii)
                  + f"   ACR {c['acr']:.3f}"]
    if "linf" in certs:
        c = certs["linf"]
        lines += [f"L-inf certificate ({c['method']}, sound interval bounds) at epsilon = {c['epsilon']:.5g} "
                  f"({c['epsilon_levels']:.3g}/255) on {c['num_images']} images of "
                  f"{c.get('data') or 'the test data'}: verified accuracy {100 * c['verified_accuracy']:.1f}%, "
                  f"clean accuracy {100 * c['clean_accuracy']:.1f}% ({c['judge']})"]
    if "certified_file" in r:
        lines.append("the certificates were computed on this file's bytes" if r["certified_file"]
                     else "the certificates do NOT match this file's bytes (it was changed after compiling)")
    return "\n".join(lines)


def format_policy(r: dict) -> str:
    lines = [f"{'layer':<28} {'W':>3} {'A':>3}", "-" * 36]
    lines += [f"{name[:28]:<28} {b['w_bits']:>3} {b['a_bits']:>3}" for name, b in r["policy"].items()]
    return "\n".join(lines)


def format_compile_report(r: dict) -> str:
    """The terminal report: a search's layers, budget and certificates next to FP32; for a fixed precision its
    policy; then the certificates the model carries."""
    if "layers" not in r:
        return format_policy(r) + "\n\n" + format_certificates(r)
    lines = [f"{'layer':<28} {'W':>3} {'A':>3} {'BitOps share':>13}", "-" * 50]
    for layer in r["layers"]:
        lines.append(f"{layer['name'][:28]:<28} {layer['w_bits']:>3} {layer['a_bits']:>3} "
                     f"{100 * layer['share']:>12.2f}%")
    lines.append("-" * 50)
    c = r["certification"]
    head = f"{'':<22}" + "".join(f"r={rad:<7}" for rad in SUMMARY_RADII) + "   ACR"
    lines += [f"method {r['method']}   budget {100 * r['budget']:.3g}% of FP32 BitOps   achieved "
              f"{100 * r['bitops_ratio_fp32']:.3g}%   size {100 * r['size_ratio_fp32']:.3g}% of FP32", "", head]
    runtime = c.get("runtime", "onnxruntime").split()[0]  # "openvino 2026.4.1 (...)" → "openvino"
    for name, block in (("FP32 (torch)", r["fp32"]), (f"{r['method']} ({runtime})", r)):
        acc = block["certified_accuracy"]
        lines.append(f"{name:<22}" + "".join(f"{100 * acc[rad]:<9.1f}" for rad in SUMMARY_RADII)
                     + f"{block['acr']:.3f}")
    lines.append(f"certified accuracy (%) on {c['num_images']} test images: sigma={c['sigma']} n={c['n']} "
                 f"n0={c['n0']} alpha={c['alpha']} (fresh seeds, never seen by the search)")
    for key in ("verification", "runtime_comparison"):
        if key in r:
            v = r[key]
            lines.append(f"{runtime} vs {v.get('reference', 'torch simulation')}: {v.get('disagreements', '?')} of "
                         f"{v.get('samples', '?')} noisy samples disagree")
    if "layerwise" in r:
        lines.append(format_layerwise(r["layerwise"]))
    if "certificates" in r:
        lines += ["", format_certificates(r)]
    return "\n".join(lines)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _plots(r: dict, others: list[dict]) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = []
    fig, ax = plt.subplots(figsize=(9, 3))
    layers = r.get("layers") or [{"name": k, **v} for k, v in r["policy"].items()]
    names = [layer["name"] for layer in layers]
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [layer["w_bits"] for layer in layers], 0.4, label="weights")
    ax.bar([x + 0.2 for x in xs], [layer["a_bits"] for layer in layers], 0.4, label="activations")
    ax.set_xticks(list(xs), names, rotation=90, fontsize=7)
    ax.set_ylabel("bits")
    ax.legend()
    figs.append(("Bits per layer", _png(fig)))
    if r.get("episodes"):
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot([e["episode"] for e in r["episodes"]], [e["reward"] for e in r["episodes"]], ".-")
        ax.set_xlabel("episode")
        ax.set_ylabel("reward")
        figs.append(("Reward per episode", _png(fig)))
    certs = r.get("certificates") or {}
    curves = ([("FP32", r["fp32"])] if "fp32" in r else []) + \
        ([(r["method"], r)] if "certified_accuracy" in r else [("compiled", certs["l2"])] if "l2" in certs else [])
    curves += [(o["method"], o) for o in others]
    if curves:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, block in curves:
            radii = sorted(block["certified_accuracy"], key=float)
            ax.plot([float(x) for x in radii], [block["certified_accuracy"][x] for x in radii], label=label)
        ax.set_xlabel("radius (L2)")
        ax.set_ylabel("certified accuracy")
        ax.legend()
        figs.append(("L2 certificate: certified accuracy vs radius (randomized smoothing)", _png(fig)))
    if "linf" in certs:
        c = certs["linf"]
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar(["clean", f"verified at eps={c['epsilon_levels']:.3g}/255"],
               [c["clean_accuracy"], c["verified_accuracy"]], color=["tab:gray", "tab:blue"])
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        figs.append(("L-inf certificate: verified accuracy (sound interval bounds)", _png(fig)))
    evaluated = [e for e in r.get("episodes", []) if "acr" in e]
    if evaluated:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        points = sorted((e["bitops_ratio_fp32"], e["acr"]) for e in evaluated)
        ax.scatter([100 * p[0] for p in points], [p[1] for p in points], s=10, alpha=0.5, label="evaluated")
        front, best = [], -1.0
        for b, acr in points:
            if acr > best:
                front.append((b, acr))
                best = acr
        ax.plot([100 * p[0] for p in front], [p[1] for p in front], "r.-", label="Pareto front")
        ax.set_xlabel("BitOps (% of FP32)")
        ax.set_ylabel("ACR (search images, IRS)")
        ax.legend()
        figs.append(("BitOps vs ACR of every evaluated policy", _png(fig)))
    plt.close("all")
    return figs


def render_html(r: dict, others: list[dict] | None = None) -> str:
    figs = _plots(r, others or [])
    body = "".join(f"<h2>{html.escape(title)}</h2><img src='data:image/png;base64,{png}'>" for title, png in figs)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>arqc report</title></head><body>"
            f"<h1>arqc compile report</h1><pre>{html.escape(format_compile_report(r))}</pre>{body}</body></html>")
