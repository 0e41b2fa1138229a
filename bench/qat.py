"""What each QAT lever buys on its own (arqc/qat.py): learned step sizes (LSQ), distillation from the FP32 model
and the learning rate, for one policy and calibration. Every variant starts from the same calibrated simulation
and trains on the same images, crops, flips and noise (one seed); the score is the top-1 accuracy of the
quantized base classifier on noisy held-out test images (bench/calibration.py's measure: what the smoothed
classifier counts votes of), next to FP32 and to the model before QAT. A cheap proxy for the certified rows of
examples/arq_experiment.py, which take an hour each here.

    python bench/qat.py --train-images 10000 \
        --finetune imagefolder:/path/to/cifar10/train \
        --train npz:../shared/data/cifar10/train_first2000_lossless.npz \
        --test npz:../shared/data/cifar10/test_first1000_lossless.npz \
        --policy examples/results/arq_cifar10_levers_runs/arq_mse_lsq10_greedy_1.5625/policy.json \
        --variants fixed:0:1e-3,lsq:0:1e-3,lsq:1:1e-3,lsq:0.5:1e-3,lsq:1:3e-3
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from calibration import noisy_accuracy, noisy_eval_arguments, noisy_eval_inputs

from arqc.data import load_images
from arqc.passes.meta import KEY
from arqc.passes.policy import load_policy
from arqc.pipeline import quantize
from arqc.qat import finetune


def parse_variants(text: str) -> list[tuple[str, float, float, str, float]]:
    """'SCALES:DISTILL:LR[:BN[:SCALE_LR]],...' → [(scales, distill, lr, bn, scale_lr), ...]; BN is folded (the
    default) or unfolded; SCALE_LR (LSQ's scales) defaults to LR."""
    variants = []
    for item in text.split(","):
        scales, distill, lr, *rest = item.split(":")
        bn = rest[0] if rest else "folded"
        variants.append((scales, float(distill), float(lr), bn, float(rest[1]) if len(rest) > 1 else float(lr)))
    return variants


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    noisy_eval_arguments(p)
    p.add_argument("--finetune", help="QAT images [default: --train]")
    p.add_argument("--train-images", type=int, help="QAT on the first N --finetune images (a fixed-seed shuffle)")
    p.add_argument("--policy", required=True, help="a policy file (a search's policy.json)")
    p.add_argument("--calibration", default="mse")
    p.add_argument("--variants", default="fixed:0:1e-3,lsq:0:1e-3,lsq:1:1e-3",
                   help="QAT variants SCALES:DISTILL:LR[:BN[:SCALE_LR]] (scales fixed or lsq; distillation weight; "
                        "learning rate; BatchNorm folded or unfolded, arqc/qat.py; LSQ's learning rate)")
    p.add_argument("--epochs", type=int, default=1)
    args = p.parse_args()
    train, prep, x, y, measure = noisy_eval_inputs(args)
    tune = load_images(args.finetune) if args.finetune else train
    if args.train_images:
        order = torch.randperm(len(tune), generator=torch.Generator().manual_seed(0))[:args.train_images]
        tune_x, tune_y = tune.x[order], tune.y[order]
    else:
        tune_x, tune_y = tune.x, tune.y
    print(f"{args.model}, policy {args.policy}, {args.calibration} calibration: {measure}; QAT {args.epochs} "
          f"epoch(s) on {len(tune_x)} images of {args.finetune or args.train}, seed 0")
    print(f"FP32: {100 * noisy_accuracy(prep.gm, x, y, args.sigma, args.draws):.1f} %")
    start = quantize(prep, load_policy(args.policy), train, args.calib_images, calib_sigma=args.sigma,
                     clipping=args.calibration)
    print("median g² per layer (the gradient factor of --qat-bn unfolded; g = γ/√(var + ε) of the folded BatchNorm): "
          + ", ".join(f"{n.target} {n.meta[KEY].bn_scale.square().median():.3g}" for n in start.graph.nodes
                      if n.op == "call_module" and n.meta.get(KEY) and n.meta[KEY].bn_scale is not None))
    print(f"before QAT: {100 * noisy_accuracy(start, x, y, args.sigma, args.draws):.1f} %", flush=True)
    print("| scales | distillation weight | lr | BatchNorm | scale lr | top-1 % | QAT s |")
    print("|---|---|---|---|---|---|---|")
    for scales, distill, lr, bn, scale_lr in parse_variants(args.variants):
        sim = copy.deepcopy(start)
        began = time.perf_counter()
        finetune(sim, tune_x, tune_y, sigma=args.sigma, epochs=args.epochs, lr=lr, augmentation="auto",
                 progress=False, device="cpu", learned_scales=scales == "lsq", scale_lr=scale_lr, teacher=prep.gm,
                 distill=distill, unfold_bn=bn == "unfolded")
        seconds = time.perf_counter() - began
        accuracy = noisy_accuracy(sim, x, y, args.sigma, args.draws)
        print(f"| {scales} | {distill:g} | {lr:g} | {bn} | {scale_lr:g} | {100 * accuracy:.1f} | {seconds:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
