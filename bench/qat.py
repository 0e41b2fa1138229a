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
import math
import time

import torch
from calibration import noisy_accuracy

from arqc.data import load_images
from arqc.passes.policy import load_policy
from arqc.pipeline import prepare_model, quantize
from arqc.qat import finetune


def parse_variants(text: str) -> list[tuple[str, float, float]]:
    """'SCALES:DISTILL:LR,...' → [(scales, distill, lr), ...]."""
    variants = []
    for item in text.split(","):
        scales, distill, lr = item.split(":")
        variants.append((scales, float(distill), float(lr)))
    return variants


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="examples/models/resnet20_cifar10_sigma025.pt")
    p.add_argument("--train", required=True, help="calibration images (the first --calib-images)")
    p.add_argument("--finetune", help="QAT images [default: --train]")
    p.add_argument("--train-images", type=int, help="QAT on the first N --finetune images (a fixed-seed shuffle)")
    p.add_argument("--test", required=True, help="held-out test images")
    p.add_argument("--policy", required=True, help="a policy file (a search's policy.json)")
    p.add_argument("--calibration", default="mse")
    p.add_argument("--variants", default="fixed:0:1e-3,lsq:0:1e-3,lsq:1:1e-3",
                   help="QAT variants SCALES:DISTILL:LR (scales fixed or lsq; distillation weight; learning rate)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--calib-images", type=int, default=256)
    p.add_argument("--test-images", type=int, default=500)
    p.add_argument("--draws", type=int, default=4)
    args = p.parse_args()
    train, test = load_images(args.train), load_images(args.test).subset(num=args.test_images)
    tune = load_images(args.finetune) if args.finetune else train
    if args.train_images:
        order = torch.randperm(len(tune), generator=torch.Generator().manual_seed(0))[:args.train_images]
        tune_x, tune_y = tune.x[order], tune.y[order]
    else:
        tune_x, tune_y = tune.x, tune.y
    prep = prepare_model(args.model, images=train)
    x, y = test.x, test.y
    samples = args.draws * len(x)
    print(f"{args.model}, policy {args.policy}, {args.calibration} calibration: top-1 of the base classifier on "
          f"{len(x)} test images x {args.draws} noise draws (sigma={args.sigma}, {samples} samples, SE <= "
          f"{100 * math.sqrt(0.25 / samples):.1f} points); QAT {args.epochs} epoch(s) on {len(tune_x)} images of "
          f"{args.finetune or args.train}, seed 0")
    print(f"FP32: {100 * noisy_accuracy(prep.gm, x, y, args.sigma, args.draws):.1f} %")
    start = quantize(prep, load_policy(args.policy), train, args.calib_images, calib_sigma=args.sigma,
                     clipping=args.calibration)
    print(f"before QAT: {100 * noisy_accuracy(start, x, y, args.sigma, args.draws):.1f} %", flush=True)
    print("| scales | distillation weight | lr | top-1 % | QAT s |")
    print("|---|---|---|---|---|")
    for scales, distill, lr in parse_variants(args.variants):
        sim = copy.deepcopy(start)
        began = time.perf_counter()
        finetune(sim, tune_x, tune_y, sigma=args.sigma, epochs=args.epochs, lr=lr, augmentation="auto",
                 progress=False, device="cpu", learned_scales=scales == "lsq", teacher=prep.gm, distill=distill)
        seconds = time.perf_counter() - began
        accuracy = noisy_accuracy(sim, x, y, args.sigma, args.draws)
        print(f"| {scales} | {distill:g} | {lr:g} | {100 * accuracy:.1f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
