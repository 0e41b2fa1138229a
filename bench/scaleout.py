"""Scale-out on Ray: certification throughput with one and two worker nodes, and the per-task overhead.

    python bench/scaleout.py [--data-root ../shared/data] [--images 16] [--n 2000] [--rounds 3]

A Ray cluster of two worker nodes with one CPU each (and a head node without CPUs) is simulated on this
machine with ray.cluster_utils.Cluster. The model is the shipped noise-trained ResNet-20
(examples/models/resnet20_cifar10_sigma025.pt) lowered to FP32 ONNX and run in onnxruntime; the images are
the first --images lossless CIFAR-10 test images (random pixels when ../shared/data is absent). Prints, in one
run, each contender's median over --rounds interleaved rounds:
- samples/s of a local run (`arqc certify` without --ray, onnxruntime on one thread);
- samples/s with one Ray worker and with two (one per node), at the default chunk size;
- the ratio two workers ÷ one worker (target ≥ 1.7);
- the scheduling overhead at the default chunk size: (wall seconds × workers − the workers' compute seconds)
  ÷ compute seconds (target ≤ 5 %), and the driver's busy seconds per chunk (what limits the number of workers
  one driver can feed);
and checks that every run gives the same points as the local one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

from arqc.certify_l2 import load_backend
from arqc.data import load_images
from arqc.runtime.cluster import open_pool
from arqc.runtime.run import certify_dataset

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "examples/models/resnet20_cifar10_sigma025.pt"
TEST = "cifar10/test_first1000_lossless.npz"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--chunk", type=int, help="images per Ray task [default: arqc's default]")
    args = p.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray.cluster_utils import Cluster

    data = Path(args.data_root) / TEST
    if data.is_file():
        images = load_images(f"npz:{data}").subset(num=args.images)
        x, y, ids = images.x.numpy(), [int(v) for v in images.y], [int(i) for i in images.ids]
        source = f"the first {args.images} images of {TEST}"
    else:
        x = np.random.default_rng(0).random((args.images, 3, 32, 32), dtype=np.float32)
        y, ids = [0] * args.images, list(range(args.images))
        source = f"{args.images} random images ({data} is absent)"
    backend = load_backend(str(MODEL), backend="ort", threads=1).backend
    settings = dict(sigma=0.25, n0=args.n0, n=args.n, alpha=0.001, batch_size=400, seed=0, progress=False)
    samples = args.images * (args.n0 + args.n)
    print(f"ResNet-20 (FP32 ONNX, onnxruntime), {source}: n = {args.n}, n0 = {args.n0}, α = 0.001, σ = 0.25, "
          f"{samples} samples per run; {args.rounds} rounds, medians")

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
    rates: dict[str, list[float]] = {"local": [], "1 worker": [], "2 workers": []}
    overhead: dict[str, list[float]] = {"1 worker": [], "2 workers": []}
    driver: dict[str, list[float]] = {"1 worker": [], "2 workers": []}
    chunks: dict[str, int] = {}
    reference = None
    try:
        for _ in range(args.rounds):
            start = time.perf_counter()
            local = certify_dataset(backend, x, y, ids, **settings)
            rates["local"].append(samples / (time.perf_counter() - start))
            reference = reference or _untimed(local.points)
            assert _untimed(local.points) == reference
            for workers in (1, 2):
                name = f"{workers} worker" + ("s" if workers > 1 else "")
                with open_pool(cluster.address, workers=workers, chunk=args.chunk) as pool:
                    certify_dataset(backend, x[:workers], y[:workers], ids[:workers], **settings | {"n": 100},
                                    pool=pool)  # warm-up: every worker builds its session
                    pool.stats = type(pool.stats)()
                    start = time.perf_counter()
                    result = certify_dataset(backend, x, y, ids, **settings, pool=pool)
                    wall = time.perf_counter() - start
                    stats = pool.stats
                assert _untimed(result.points) == reference, f"{name}: other points than the local run"
                rates[name].append(samples / wall)
                overhead[name].append((stats.wall_s * workers - stats.compute_s) / stats.compute_s)
                driver[name].append((stats.wall_s - stats.waiting_s) / stats.chunks)
                chunks[name] = stats.chunks
    finally:
        ray.shutdown()
        cluster.shutdown()

    med = {k: statistics.median(v) for k, v in rates.items()}
    for name, rate in med.items():
        line = f"{name:>10}: {rate:8.0f} samples/s"
        if name in overhead:
            line += (f"   ({chunks[name]} chunks; overhead {100 * statistics.median(overhead[name]):.1f} % of task "
                     f"time; driver busy {1000 * statistics.median(driver[name]):.1f} ms per chunk)")
        print(line)
    print(f"two workers ÷ one worker: {med['2 workers'] / med['1 worker']:.2f}× (target ≥ 1.7×)")
    print(f"one worker ÷ local: {med['1 worker'] / med['local']:.2f}×")
    print(f"overhead at the default chunk size: {100 * statistics.median(overhead['2 workers']):.1f} % "
          "(two workers; target ≤ 5 %)")
    print("every run gave the local run's points")


def _untimed(points: list[dict]) -> list[dict]:
    return [{k: v for k, v in p.items() if k != "seconds"} for p in points]


if __name__ == "__main__":
    main()
