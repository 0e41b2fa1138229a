"""QA-IBP at small scale on MNIST or CIFAR-10: train quantized CNNs with QA-IBP, then certify them with IBP
and the complete verifier (counterexamples confirmed on the lowered ONNX model).

    python examples/qaibp/qaibp_experiment.py --dataset mnist --train-data mnist:../shared/data/mnist:train \
        --test-data mnist:../shared/data/mnist:test --out /tmp/qaibp
    python examples/qaibp/qaibp_experiment.py --dataset cifar10 --train-data imagefolder:CIFAR_JPEG/train \
        --test-data npz:../shared/data/cifar10/test_first1000_lossless.npz --out /tmp/qaibp_cifar

For every bit width and ε it trains a fresh model (ε_train = ε) and writes <out>/<dataset>_w<b>a<b>_eps<k>.json
(the certify report plus the training history) and .onnx; it prints one markdown row per configuration.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from arqc.archs import CIFAR_MEAN, CIFAR_STD, MNIST_MEAN, MNIST_STD, Normalize
from arqc.certify_linf import certify_ibp, format_linf_report
from arqc.data import load_images
from arqc.passes.analysis import analyze
from arqc.passes.capture import capture
from arqc.passes.lower import lower
from arqc.passes.policy import uniform
from arqc.qaibp import train_qaibp

DATASETS = {"mnist": ((1, 28, 28), MNIST_MEAN, MNIST_STD), "cifar10": ((3, 32, 32), CIFAR_MEAN, CIFAR_STD)}


class SmallCNN(nn.Module):
    """The "small" IBP network of Gowal et al. (2018): conv 16 4×4/2, conv 32 4×4/1, fc 100, fc 10."""

    def __init__(self, dataset: str):
        super().__init__()
        (c, h, _), mean, std = DATASETS[dataset]
        side = (h - 4) // 2 + 1 - 3  # after conv1 (stride 2) and conv2
        self.normalize = Normalize(mean, std)
        self.conv1 = nn.Conv2d(c, 16, 4, 2)
        self.conv2 = nn.Conv2d(16, 32, 4, 1)
        self.fc1 = nn.Linear(32 * side * side, 100)
        self.fc2 = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(self.normalize(x)))))
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="mnist")
    ap.add_argument("--train-data", required=True, help="training images, e.g. mnist:DIR:train")
    ap.add_argument("--test-data", required=True, help="test images the model never saw, e.g. mnist:DIR:test")
    ap.add_argument("--out", default="/tmp/qaibp", help="where reports and ONNX models go")
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--epsilons", type=int, nargs="+", default=[1, 4], help="ε in grid steps (k/255)")
    ap.add_argument("--train-images", type=int, default=30000)
    ap.add_argument("--test-images", type=int, default=500)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--timeout", type=float, default=5.0, help="complete verifier, seconds per input")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train = load_images(args.train_data).subset(num=args.train_images)
    test = load_images(args.test_data).subset(num=args.test_images)
    rows = []
    for bits in args.bits:
        for k in args.epsilons:
            torch.manual_seed(args.seed)
            shape = DATASETS[args.dataset][0]
            gm = analyze(capture(SmallCNN(args.dataset).eval(), torch.zeros(1, *shape)))
            start = time.monotonic()
            sim, history = train_qaibp(gm, train, k / 255, args.epochs, uniform(gm, bits, bits),
                                       seed=args.seed, device="cpu",
                                       log=lambda r: print(json.dumps(r), flush=True))
            train_s = time.monotonic() - start
            model = lower(sim, {"example": "examples/qaibp/qaibp_experiment.py", "epsilon": k / 255})
            name = f"{args.dataset}_w{bits}a{bits}_eps{k}"
            (out / f"{name}.onnx").write_bytes(model.SerializeToString())
            report = certify_ibp(sim, test, k / 255, complete=True, timeout=args.timeout, onnx_model=model,
                                 device="cpu")
            print(format_linf_report(report), flush=True)
            report.update(bits=bits, train_seconds=train_s, history=history, args=vars(args))
            (out / f"{name}.json").write_text(json.dumps(report, indent=1))
            rows.append(f"| W{bits}A{bits} | {k}/255 | {100 * report['clean_accuracy']:.1f} | "
                        f"{100 * report['ibp_verified_accuracy']:.1f} | "
                        f"{100 * report['verified_accuracy']:.1f} | "
                        f"{report['falsified']} | {report['timeouts']} | {report['time_per_input_s']:.3f} | "
                        f"{train_s / 60:.1f} |")
    print("| bits | ε | clean % | IBP verified % | complete verified % | falsified | timeouts | s/input | "
          "train min |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
