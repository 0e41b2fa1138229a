"""Post-training quantization error of each calibration method (passes/quantize.py: CALIBRATIONS), before any
QAT, with and without empirical bias correction (passes/quantize.py: correct_biases, on the calibration images):
the top-1 accuracy of the quantized base classifier on noisy held-out test images (what the smoothed classifier
counts votes of), next to FP32, for a policy file and uniform policies. Every method sees the same
calibration images, the same noise and the same test samples.

    python bench/calibration.py --model examples/models/resnet20_cifar10_sigma025.pt \
        --train npz:../shared/data/cifar10/train_first2000_lossless.npz \
        --test npz:../shared/data/cifar10/test_first1000_lossless.npz \
        --policy examples/results/arq_cifar10_semantics2_runs/greedy_1.5625/policy.json
"""

from __future__ import annotations

import argparse
import math

import torch

from arqc.data import load_images
from arqc.passes.policy import load_policy, uniform
from arqc.passes.quantize import CALIBRATIONS, correct_biases
from arqc.pipeline import calibration_batches, prepare_model, quantize


def noisy_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, sigma: float, draws: int) -> float:
    """Top-1 accuracy over ``draws`` fixed-seed noise draws per image."""
    gen = torch.Generator().manual_seed(1)
    correct = 0
    with torch.inference_mode():
        for _ in range(draws):
            noisy = x + sigma * torch.randn(x.shape, generator=gen)
            batches = zip(noisy.split(500), y.split(500), strict=True)
            correct += sum(int((model(b).argmax(1) == t).sum()) for b, t in batches)
    return correct / (draws * len(x))


def noisy_eval_arguments(p: argparse.ArgumentParser) -> None:
    """The options of a bench that scores quantized models with :func:`noisy_accuracy` (also bench/qat.py)."""
    p.add_argument("--model", default="examples/models/resnet20_cifar10_sigma025.pt")
    p.add_argument("--train", required=True, help="calibration images (the first --calib-images)")
    p.add_argument("--test", required=True, help="held-out test images")
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--calib-images", type=int, default=256)
    p.add_argument("--test-images", type=int, default=500)
    p.add_argument("--draws", type=int, default=4)


def noisy_eval_inputs(args: argparse.Namespace):
    """(calibration images, prepared model, test images, test labels, what the score is) for
    :func:`noisy_eval_arguments`."""
    train, test = load_images(args.train), load_images(args.test).subset(num=args.test_images)
    samples = args.draws * len(test)
    measure = (f"top-1 of the base classifier on {len(test)} test images x {args.draws} noise draws "
               f"(sigma={args.sigma}, {samples} samples, SE <= {100 * math.sqrt(0.25 / samples):.1f} points)")
    return train, prepare_model(args.model, images=train), test.x, test.y, measure


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    noisy_eval_arguments(p)
    p.add_argument("--policy", action="append", default=[], help="policy files (a search's policy.json)")
    p.add_argument("--uniform", default="4,3", help="uniform WbAb policies to add, comma-separated bits")
    args = p.parse_args()
    train, prep, x, y, measure = noisy_eval_inputs(args)
    print(f"{args.model}: {measure}; calibration: the first {args.calib_images} --train images with noise sigma; "
          "no QAT")
    print(f"FP32: {100 * noisy_accuracy(prep.gm, x, y, args.sigma, args.draws):.1f} %")
    policies = [(path, load_policy(path)) for path in args.policy]
    policies += [(f"uniform W{b}A{b}", uniform(prep.gm, int(b), int(b))) for b in args.uniform.split(",") if b]
    columns = [(method, False) for method in CALIBRATIONS] + [(method, True) for method in CALIBRATIONS]
    print("| policy | " + " | ".join(m + (" + bias correction" if bc else "") for m, bc in columns) + " |")
    print("|---|" + "---|" * len(columns))
    batches = calibration_batches(train, args.calib_images, args.sigma)
    for name, policy in policies:
        row = []
        for method, bias_correction in columns:
            sim = quantize(prep, policy, train, args.calib_images, calib_sigma=args.sigma, clipping=method)
            if bias_correction:
                correct_biases(sim, prep.gm, batches)
            row.append(f"{100 * noisy_accuracy(sim, x, y, args.sigma, args.draws):.1f}")
        print(f"| {name} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
