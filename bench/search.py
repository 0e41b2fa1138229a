"""Wall time of the ARQ search pipeline on this machine, split by stage, with the episode count and the
samples spent (the models issue's target: >= 60 episodes on >= 100 search images within 30 minutes on a
2-core CPU).

    python bench/search.py --model examples/models/resnet20_cifar10_sigma025.pt \
        --train npz:../shared/data/cifar10/train_first2000_lossless.npz \
        --test npz:../shared/data/cifar10/test_first1000_lossless.npz
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from arqc.arq import Run
from arqc.data import load_images
from arqc.pipeline import prepare_model
from arqc.settings import SearchSettings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="examples/models/resnet20_cifar10_sigma025.pt")
    p.add_argument("--train", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--budget", type=float, default=1 / 64)
    p.add_argument("--episodes", type=int, default=60)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--search-images", type=int, default=100)
    p.add_argument("--cache-n", type=int, default=1000)
    p.add_argument("--search-n", type=int, default=200)
    p.add_argument("--test-images", type=int, default=20)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--workdir", help="keep the run's stages here (the experiment script can then reuse them, "
                   "examples/arq_experiment.py); default: a temporary directory")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    train, test = load_images(args.train), load_images(args.test)
    prep = prepare_model(args.model, images=train)
    s = SearchSettings(method="arq", budget=args.budget, sigma=0.25, episodes=args.episodes, warmup=args.warmup,
                       search_images=args.search_images, cache_n=args.cache_n, search_n=args.search_n,
                       test_images=args.test_images, n=args.n, finetune_epochs=1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        run = Run(prep, train, test, s, Path(args.workdir or scratch), resume=False)
        _, report, _ = run.run(prep.settings(purpose="bench"))
    total = time.perf_counter() - start
    print(f"ARQ search on {args.model}: {args.episodes} episodes ({args.warmup} warm-up), {args.search_images} "
          f"search images, IRS n'={args.search_n} against an FP32 cache of n={args.cache_n}, sigma=0.25, "
          f"{args.threads} thread(s)")
    print(f"samples spent by the search: {report['search_samples']:,} (+ {args.search_images * (args.cache_n + 100):,}"
          " for the FP32 cache)")
    for stage, seconds in report["timings_s"].items():
        within = "  (within search)" if stage in ("fp32 cache", "demo") else ""
        print(f"  {stage:<14} {seconds:8.1f} s{within}")
    print(f"  {'total':<14} {total:8.1f} s   (target: search stages within 1800 s on 2 cores)")


if __name__ == "__main__":
    main()
