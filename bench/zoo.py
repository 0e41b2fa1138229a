"""Every torchvision classifier through arqc: capture, MAC count, W8A8 and mixed 4/8 compile, lowering,
onnxruntime, interval bounds.

For each model of ``torchvision.models.list_models(module=torchvision.models)`` (random weights, 1000 classes):
1. MACs: the architecture as torchvision builds it for its weights with the smallest resolution (ViT and MaxViT
   take their image size from the weights), analyzed at that resolution; compared with the weights' published
   ``_ops`` figure (GMACs, counted by torchvision over conv, linear and matmul).
2. Compile at the smallest input size the architecture accepts: the smallest ``min_size`` over its weights, and
   at least 32×32 (CIFAR-sized) for the convnets that take anything: capture, analyze, W8A8 and a mixed policy
   (each layer 4 or 8 bits for weights and activations, seeded), calibrated on 8 random images, lowered to QDQ
   ONNX and run in onnxruntime (CPU, ORT_ENABLE_ALL) on 32 random images. Columns: the cosine similarity of the
   simulation's and onnxruntime's logits (all 32 images' logits as one vector) for W8A8 and the mixed policy at
   the default float scales, and for the mixed policy at po2 scales (exact integer layers, see
   passes/quantize.py); the floor: the lowest cosine of the simulation's logits with its own logits on the same
   images moved by about one float32 ulp (2^-22, random signs), over the three; the worst single image's cosine
   and the lowest top-1 agreement with onnxruntime over the three; fp32: the cosine of the W8A8 simulation's
   logits with the float model's. A random-weight network can be chaotic (an ulp of input changes its logits) and
   dominated by its own rounding (fp32 far below 1), so these say more about the network than about the lowering.
3. Layer by layer (runtime/layerwise.py): each quantizer of the simulation fed onnxruntime's values before it,
   its codes compared with onnxruntime's. Columns over the three policies: the share of codes that differ
   (flips), the largest difference in steps, and the cosine of the logits computed from onnxruntime's last codes
   with onnxruntime's (forced). Status: "ok" when both float-scale cosines are at least 0.999; "layers" when
   they are not but every rounding agrees (at most one step, on at most FLIP_RATE of the codes, forced cosine
   at least FORCED_COSINE): a lowering of the same function whose few float32 near-ties the network amplifies;
   "MISMATCH" otherwise (and whenever the IBP check below fails). Weights
   that torchvision initializes to zero (ViT's head) are drawn at random too, and BatchNorm statistics are
   measured on the calibration images (:func:`randomized`).
4. IBP: sound interval bounds (float32) of the W8A8 simulation on L∞ boxes of radius 1/255 around 2 images
   contain the simulation's outputs at 8 random points of each box.

    python bench/zoo.py                       # all 80 models (about an hour on 2 cores)
    python bench/zoo.py --only resnet18,vit_b_16 --skip-macs
    python bench/zoo.py --control ../shared/data   # trained CIFAR-10 ResNets next to random twins
"""

from __future__ import annotations

import argparse
import time
import traceback
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torchvision
from torchvision.models import get_model, get_model_weights

from arqc import archs
from arqc.data import load_images
from arqc.loading import load_model
from arqc.passes.analysis import analyze, profile
from arqc.passes.capture import capture
from arqc.passes.lower import lower
from arqc.passes.meta import info, quantizable_nodes
from arqc.passes.policy import apply_policy, uniform
from arqc.passes.quantize import simulate
from arqc.runtime.ibp import input_box, interval_bounds
from arqc.runtime.layerwise import compare_layerwise

MIN_SIZE = 32  # the smallest size tried for architectures that take any input
# Layer by layer (runtime/layerwise.py), a lowering of the simulation's function: every code within one step of
# the runtime's, at most this share of them off (float32 near-ties), and the logits computed from the runtime's
# last codes this close to its own.
FLIP_RATE, FORCED_COSINE = 1e-3, 0.9999


def smallest_weights(name: str):
    """The model's weights entry with the smallest crop size (DEFAULT among equals)."""
    entries = list(get_model_weights(name))
    default = get_model_weights(name).DEFAULT
    return min(entries, key=lambda w: (w.transforms.keywords.get("crop_size", 224), w is not default))


def arch_kwargs(name: str, weights) -> dict:
    """The architecture arguments torchvision's builder takes from ``weights`` (besides the class count)."""
    size = weights.meta["min_size"]
    if name.startswith("vit_"):
        return {"image_size": size[0]}
    if name.startswith("maxvit"):
        return {"input_size": size}
    return {}


def compile_size(name: str) -> int:
    return max(MIN_SIZE, min(w.meta["min_size"][0] for w in get_model_weights(name)))


def counted_macs(name: str) -> tuple[float, float, int]:
    """(counted GMACs, published GMACs, resolution)."""
    weights = smallest_weights(name)
    size = weights.transforms.keywords.get("crop_size", 224)
    torch.manual_seed(0)
    model = get_model(name, **arch_kwargs(name, weights)).eval()
    gm = analyze(capture(model, torch.rand(1, 3, size, size)))
    return profile(gm).total_macs / 1e9, float(weights.meta["_ops"]), size


def mixed(gm: torch.fx.GraphModule, seed: int = 0) -> dict[str, tuple[int, int]]:
    rng = np.random.default_rng(seed)
    return {info(n).layer: (int(rng.choice([4, 8])), int(rng.choice([4, 8]))) for n in quantizable_nodes(gm)}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def randomized(model: torch.nn.Module, images: torch.Tensor) -> torch.nn.Module:
    """A random-weight model that behaves like a trained one in scale: every all-zero weight drawn at random
    (N(0, 0.02²): ViT's head starts at zero, which makes every logit 0), and the BatchNorm running statistics
    measured on ``images`` (one pass in training mode, as bench/equivalence.py does). With torchvision's initial
    statistics (mean 0, variance 1) the signal of GoogLeNet's 0.01-scaled weights dies out within a few layers
    (logits of order 1e-8) and EfficientNet's grows, so quantization noise would be all that is left."""
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average over the pass
        if norms:  # only the norms in training mode: Inception's auxiliary head, which runs in training, needs 299
            model.eval()
            for m in norms:
                m.train()
            model(images)
    return model.eval()


HEADER = (f"{'model':20s} {'GMACs':>8s} {'paper':>8s} {'diff':>7s} {'res':>4s} | {'size':>4s} {'layers':>6s} "
          f"{'W8A8':>8s} {'mixed':>8s} {'mix po2':>8s} | {'fp32':>7s} {'floor':>7s} {'worst':>6s} {'top-1':>5s} | "
          f"{'flips':>7s} {'steps':>5s} {'forced':>8s} | {'IBP':>4s} {'status':8s} {'s':>5s}")
POLICIES = (("w8a8", "float"), ("mixed", "float"), ("mixed", "po2"))  # (policy, scales); float is the default


def compile_and_check(name: str, n_inputs: int, threads: int) -> dict:
    size = compile_size(name)
    g = torch.Generator().manual_seed(1)
    calib = torch.rand(8, 3, size, size, generator=g)
    x = torch.rand(n_inputs, 3, size, size, generator=g)
    torch.manual_seed(0)
    return {"size": size, **check(randomized(get_model(name).eval(), calib), calib, x, threads, g)}


def check(model: torch.nn.Module, calib: torch.Tensor, x: torch.Tensor, threads: int, g: torch.Generator) -> dict:
    """Steps 2-4 for one model (given as the only reference to it: it is freed once captured); ``g`` draws the
    nudges of the floor and the points of the IBP check."""
    gm = analyze(capture(model, x[:1]))
    with torch.no_grad():
        fp32 = torch.cat([model(x[i:i + 8]) for i in range(0, len(x), 8)]).numpy()
    cos, worst, agree, floor, layers = {}, {}, {}, {}, {}
    del model  # the captured graph holds what is needed; one simulation at a time keeps ViT-H/14 within memory
    nudged = x * (1 + 2.0 ** -22 * torch.randint(0, 2, x.shape, generator=g) * 2 - 2.0 ** -22)  # ±1 ulp or so
    for label, scales in POLICIES:
        apply_policy(gm, uniform(gm, 8, 8) if label == "w8a8" else mixed(gm))
        sim = simulate(gm, [calib], scales=scales)
        if (label, scales) == ("w8a8", "float"):
            bounded = sim  # the interval bounds below are checked on this one
        with torch.no_grad():
            ref = torch.cat([sim(x[i:i + 8]) for i in range(0, len(x), 8)]).numpy()
            again = torch.cat([sim(nudged[i:i + 8]) for i in range(0, len(x), 8)]).numpy()
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        lowered = lower(sim, {})
        session = ort.InferenceSession(lowered.SerializeToString(), so, providers=["CPUExecutionProvider"])
        out = np.concatenate([session.run(None, {"input": x[i:i + 8].numpy()})[0] for i in range(0, len(x), 8)])
        key = f"{label} {scales}"
        layers[key] = compare_layerwise(sim, lowered, x, threads)
        cos[key] = float(cosines(ref.reshape(1, -1), out.reshape(1, -1))[0])
        worst[key] = float(cosines(ref, out).min())
        agree[key] = float((ref.argmax(1) == out.argmax(1)).mean())
        floor[key] = float(cosines(ref.reshape(1, -1), again.reshape(1, -1))[0])
        if key == "w8a8 float":
            fidelity = float(cosines(ref.reshape(1, -1), fp32.reshape(1, -1))[0])
        del sim, session, lowered
    lo, hi = input_box(x[:2], 1 / 255)
    b_lo, b_hi = interval_bounds(bounded, lo, hi, dtype=torch.float32)
    contained = True
    with torch.no_grad():
        for _ in range(8):
            y = bounded(lo + (hi - lo) * torch.rand(lo.shape, generator=g))
            contained &= bool(((y >= b_lo) & (y <= b_hi)).all())
    return {"cosine": cos, "worst": worst, "top1": agree, "floor": floor, "layerwise": layers,
            "fidelity": fidelity, "ibp": contained,
            "layers": len(quantizable_nodes(gm))}


def judge(r: dict) -> tuple[str, str]:
    """(status, the row's cells from size to IBP) of a :func:`compile_and_check` result."""
    c, f, lw = r["cosine"], r["floor"], r["layerwise"].values()
    strict = min(c["w8a8 float"], c["mixed float"]) >= 0.999
    flips = sum(x.differing for x in lw) / sum(x.elements for x in lw)
    steps, forced = max(x.max_steps for x in lw), min(x.logits_cosine for x in lw)
    layers_agree = steps <= 1 and flips <= FLIP_RATE and forced >= FORCED_COSINE
    status = "MISMATCH" if not (layers_agree and r["ibp"]) else "ok" if strict else "layers"
    return status, (f"{r['size']:4d} {r['layers']:6d} {c['w8a8 float']:8.5f} {c['mixed float']:8.5f} "
                    f"{c['mixed po2']:8.5f} | {r['fidelity']:7.5f} {min(f.values()):7.5f} "
                    f"{min(r['worst'].values()):6.3f} {min(r['top1'].values()):5.2f} | {flips:7.1e} {steps:5d} "
                    f"{forced:8.6f} | {'yes' if r['ibp'] else 'NO':>4s} ")


CONTROL = {"resnet20": "resnet20-12fca82f.th", "resnet32": "resnet32-d509ac18.th",
           "resnet44": "resnet44-014dd654.th", "resnet56": "resnet56-4bfd9763.th"}


def control(data: Path, n_inputs: int, threads: int) -> None:
    """The same checks on trained networks next to the same architectures with random weights: akamaster's
    CIFAR-10 ResNets (../shared/data/weights) and lossless CIFAR-10 images (8 training images to calibrate,
    the first ``n_inputs`` test images to compare on), so that the weights are the only difference."""
    train = load_images(f"npz:{data / 'cifar10/train_first2000_lossless.npz'}").x[:8]
    test = load_images(f"npz:{data / 'cifar10/test_first1000_lossless.npz'}").x[:n_inputs]
    print(f"control: akamaster's trained CIFAR-10 ResNets and the same architectures with random weights, "
          f"{n_inputs} lossless CIFAR-10 test images")
    for arch, file in CONTROL.items():
        for weights in ("trained", "random"):
            start = time.perf_counter()
            if weights == "trained":
                model = load_model(str(data / "weights/akamaster-resnet-cifar10" / file), arch).model.eval()
            else:
                torch.manual_seed(0)
                model = randomized(archs.build(arch).eval(), train)
            status, cells = judge({"size": 32, **check(model, train, test, threads, torch.Generator().manual_seed(1))})
            print(f"{arch + ' ' + weights:20s} {'':8s} {'':8s} {'':7s} {'':4s} | {cells}{status:8s} "
                  f"{time.perf_counter() - start:5.1f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated model names (default: all)")
    parser.add_argument("--inputs", type=int, default=32, help="random inputs compared per policy")
    parser.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--skip-macs", action="store_true", help="do not count MACs at the published resolution")
    parser.add_argument("--skip-compile", action="store_true", help="only count MACs")
    parser.add_argument("--control", type=Path, metavar="DATA",
                        help="only the trained-vs-random control on CIFAR-10 ResNets from DATA (../shared/data)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.control is not None:
        print(HEADER)
        control(args.control, args.inputs, args.threads)
        return
    names = torchvision.models.list_models(module=torchvision.models)
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    print(f"torchvision {torchvision.__version__}, torch {torch.__version__}, onnxruntime {ort.__version__}; "
          f"{len(names)} models, random weights, {args.inputs} random inputs per policy, threads={args.threads}")
    print(HEADER)
    passed, layered, macs_ok, macs_checked, rows = 0, 0, 0, 0, []
    for name in names:
        start = time.perf_counter()
        row = f"{name:20s} "
        try:
            if args.skip_macs:
                row += f"{'':8s} {'':8s} {'':7s} {'':4s} | "
            else:
                counted, published, res = counted_macs(name)
                diff = counted / published - 1
                macs_checked += 1
                macs_ok += abs(diff) <= 0.02
                row += f"{counted:8.3f} {published:8.3f} {100 * diff:+6.2f}% {res:4d} | "
            if args.skip_compile:
                status = "ok"
                row += " " * 70
            else:
                r = compile_and_check(name, args.inputs, args.threads)
                rows.append((name, r))
                status, cells = judge(r)
                row += cells
            passed += status == "ok"
            layered += status == "layers"
        except Exception as err:  # a row per model: report and go on
            status = "FAILED"
            row += f"{type(err).__name__}: {str(err).splitlines()[0][:150] if str(err) else ''} "
            if args.only:
                traceback.print_exc()
        print(f"{row}{status:8s} {time.perf_counter() - start:5.1f}", flush=True)
    if args.skip_compile:
        print(f"summary: {passed} of {len(names)} models captured and analyzed; MACs within 2% of torchvision's "
              f"figure for {macs_ok} of {macs_checked}")
        return
    print(f"summary: {passed} of {len(names)} models compile (W8A8 and mixed 4/8), lower and run in onnxruntime with "
          f"logits cosine >= 0.999 at the default float scales and IBP bounds that contain the simulation; "
          f"{layered} more whose every rounding agrees with onnxruntime fed onnxruntime's own input (at most one step, "
          f"on at most {FLIP_RATE:.0e} of the codes; layers); MACs within 2% of torchvision's figure for {macs_ok} "
          f"of {macs_checked}")
    if rows:
        for key in rows[0][1]["cosine"]:
            values = [r["cosine"][key] for _, r in rows]
            print(f"  {key:12s}: cosine >= 0.999 for {sum(v >= 0.999 for v in values)} of {len(values)}, median "
                  f"{np.median(values):.6f}, lowest {min(values):.5f} ({rows[int(np.argmin(values))][0]}); "
                  f"top-1 agreement median {np.median([r['top1'][key] for _, r in rows]):.3f}")


if __name__ == "__main__":
    main()
