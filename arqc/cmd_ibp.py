"""``arqc certify --method ibp``: deterministic L∞ certificates of the quantized network itself (QA-IBP's
interval bounds, optionally completed by the verifier). MODEL is an ONNX model arqc emitted (its metadata
says how it is quantized; counterexamples are confirmed in onnxruntime) or a checkpoint plus
--bits/--w-bits/--a-bits/--policy (and --calib-data for quantized activations)."""

from __future__ import annotations

import click

from arqc.errors import ArqcError


def parse_epsilon(text: str) -> float:
    """"2/255" or "0.0078" → float."""
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise ArqcError(f"--epsilon {text!r} is not a number; give e.g. 2/255 or 0.0078") from None


def ibp_options(f):
    for decorator in reversed([
        click.option("--method", type=click.Choice(["rs", "ibp"]), default="rs", show_default=True,
                     help="rs: randomized smoothing (L2, statistical); ibp: interval bounds (L∞, deterministic)."),
        click.option("--epsilon", help="L∞ radius for --method ibp, in [0, 1] pixel units (e.g. 2/255)."),
        click.option("--complete", is_flag=True, help="--method ibp: split boxes until verified or falsified."),
        click.option("--timeout", type=float, default=10.0, show_default=True,
                     help="--method ibp --complete: seconds per input."),
        click.option("--bits", type=int, help="--method ibp on a checkpoint: uniform bits."),
        click.option("--w-bits", type=int, help="--method ibp on a checkpoint: weight bits."),
        click.option("--a-bits", type=int, help="--method ibp on a checkpoint: activation bits."),
        click.option("--policy", "policy_path", type=click.Path(dir_okay=False),
                     help="--method ibp on a checkpoint: precision policy JSON."),
        click.option("--calib-data", help="--method ibp on a checkpoint: calibration images (training split)."),
    ]):
        f = decorator(f)
    return f


def certify_ibp_cli(model: str, *, data: str, epsilon: str | None, complete: bool, timeout: float,
                    num_images: int | None, skip: int, json_path: str | None, arch: str | None,
                    trust_pickle: bool, input_shape, bits, w_bits, a_bits, policy_path, calib_data) -> None:
    from arqc.cli import resolve_policy, write_json
    from arqc.data import check_compatible, load_images
    from arqc.ibp_report import certify_ibp, format_report
    from arqc.onnx_import import simulation_from_onnx
    from arqc.pipeline import load_data, prepare, quantize

    if epsilon is None:
        raise ArqcError("--method ibp needs --epsilon (the L∞ radius, e.g. 2/255)")
    eps = parse_epsilon(epsilon)
    images = load_images(data).subset(num=num_images, skip=skip)
    onnx_model = None
    if model.endswith(".onnx"):
        if bits or w_bits or a_bits or policy_path or calib_data:
            raise ArqcError(f"{model} already says how it is quantized; drop --bits/--policy/--calib-data")
        sim, meta = simulation_from_onnx(model, trust_pickle=trust_pickle)
        settings = meta["arqc.settings"]
        shape, classes, onnx_model = tuple(settings["input_shape"]), settings.get("num_classes"), model
    else:
        calib = load_data(calib_data)
        prep = prepare(model, arch, trust_pickle, input_shape, calib)
        policy = resolve_policy(prep.gm, bits, w_bits, a_bits, policy_path, default=32)
        sim = quantize(prep, policy, calib)
        shape, classes = prep.input_shape, prep.loaded.num_classes
    check_compatible(images, shape, classes)
    report = certify_ibp(sim, images, eps, complete=complete, timeout=timeout, onnx_model=onnx_model)
    report.update({"model": model, "data": data, "skip": skip})
    click.echo(format_report(report))
    if json_path:
        write_json(json_path, report)
        click.echo(f"wrote {json_path}")
