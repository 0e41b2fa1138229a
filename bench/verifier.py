"""Throughput of the IBP verifier: sub-boxes bounded per second, CPU (and GPU when there is one).

    python bench/verifier.py [--arch mnist_cnn] [--batch 256] [--seconds 5] [--threads N]

Bounds: sound margin bounds of a W8A8 simulation (float64 and float32 arithmetic) and, for comparison,
the unsound training-mode bounds. Verifier: the complete verifier's split loop on one MNIST-shaped input
of a random-weight network (IBP never certifies it, so every iteration bounds, guides and splits a full
batch; the attack is off), over --seconds.
"""

from __future__ import annotations

import argparse
import time

import torch

from arqc.archs import build, get_arch
from arqc.passes.analysis import analyze
from arqc.passes.capture import capture
from arqc.passes.policy import apply_policy, uniform
from arqc.passes.quantize import simulate
from arqc.runtime.ibp import input_box, margin_bounds
from arqc.runtime.verify import verify_complete


def rate(fn, items: int, seconds: float) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start, done = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        fn()
        done += items
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="mnist_cnn")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = get_arch(args.arch).input_shape
    gm = analyze(capture(build(args.arch), torch.zeros(1, *shape)))
    apply_policy(gm, uniform(gm, 8, 8))
    sim = simulate(gm, [torch.rand(64, *shape)])
    x = (torch.randint(0, 256, (args.batch, *shape)) / 255).float()
    labels = torch.zeros(args.batch, dtype=torch.long)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    gpu = f", GPU {torch.cuda.get_device_name()}" if "cuda" in devices else ""
    print(f"{args.arch} W8A8, batch {args.batch}, epsilon 2/255, torch {torch.__version__}, "
          f"{args.threads} CPU thread(s){gpu}")
    print(f"{'device':<7} {'what':<36} {'sub-boxes/s':>12}")
    for device in devices:
        sim.to(device)
        box = (*input_box(x.to(device), 2 / 255), labels.to(device))
        for name, kwargs in (("sound bounds, float64", dict(dtype=torch.float64)),
                             ("sound bounds, float32", dict(dtype=torch.float32)),
                             ("training bounds (not sound), float32", dict(sound=False))):
            with torch.no_grad():
                r = rate(lambda kwargs=kwargs, box=box: margin_bounds(sim, *box, **kwargs), args.batch,
                         args.seconds)
            print(f"{device:<7} {name:<36} {r:>12.0f}")
        v = verify_complete(sim, x[0], 0, 2 / 255, timeout=args.seconds, batch_size=args.batch,
                            attack_steps=0)
        what = f"complete verifier loop ({v.status})"
        print(f"{device:<7} {what:<36} {v.subboxes / v.seconds:>12.0f}")

if __name__ == "__main__":
    main()
