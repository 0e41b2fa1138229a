"""Certification speed and IRS savings on ResNet-20 (akamaster CIFAR-10 weights), on this machine's CPU.

    python bench/certify.py [--data-root ../shared/data] [--quick]

Prints, in one run:
1. samples/s of arqc's CERTIFY (arqc.runtime.smoothing.certify: seeded noise + a backend) ÷ a plain
   PyTorch eager loop in Cohen et al.'s style (locuslab/smoothing core.py: batch loop,
   torch.randn_like(batch) * sigma, model(batch + noise).argmax(1), numpy bincount) on the same FP32 model,
   images, n0, n and batch size: for the W8A8 model in onnxruntime's integer kernels (the deployed model,
   target ≥ 3×), for the same file in OpenVINO's CPU plugin (extra arqc[openvino]) and for arqc's best FP32
   backend (target ≥ 3×);
2. the best FP32 rate ÷ the machine's FLOP bound = measured peak GFLOP/s of a float32 2048³ torch.matmul ÷
   (2 × MACs per sample) (target ≥ 0.8);
3. IRS samples ÷ full-RS samples for a W8A8 ResNet-20 at σ = 0.5 at equal ACR (target ≤ 1/3): certify FP32
   with n and keep the IRS cache; certify W8A8 by IRS with n' = n/20, n/10, n/4, and by full RS with the
   fewest estimation samples (a multiple of 100) whose ACR reaches IRS's. Samples count forward passes of
   the W8A8 model per point (IRS: n'; full RS: n0 + n); the FP32 cache is paid once and not counted.
The machine is shared: every throughput contender runs in interleaved rounds and its best round counts, and
everything (torch, onnxruntime, the matmul peak) runs on --threads threads (default 1: on an oversubscribed
CPU, spinning worker threads make two threads slower than one).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import norm

from arqc import archs
from arqc.base import ArqcError
from arqc.data import load_images
from arqc.passes.analysis import profile
from arqc.passes.lower import lower
from arqc.passes.policy import apply_policy, uniform
from arqc.passes.quantize import simulate
from arqc.pipeline import prepare_model
from arqc.runtime.backends import Backend, OpenVinoBackend, OrtBackend, TorchBackend
from arqc.runtime.irs import build_cache, certify_incremental
from arqc.runtime.metrics import summarize
from arqc.runtime.noise import NOISE_BLOCK, Phase, noise_block, point_seed
from arqc.runtime.smoothing import ABSTAIN, certify, lower_confidence_bound, sample_predictions

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "weights/akamaster-resnet-cifar10/resnet20-12fca82f.th"
TEST, TRAIN = "cifar10/test_first1000_lossless.npz", "cifar10/train_first2000_lossless.npz"


# --- 1. the baseline: Cohen et al.'s sampling loop, in plain PyTorch ----------------------------------------


def cohen_sample_noise(model: torch.nn.Module, x: torch.Tensor, num: int, batch_size: int, sigma: float,
                       num_classes: int = 10) -> np.ndarray:
    """locuslab/smoothing core.py ``Smooth._sample_noise``: class counts of f on ``num`` noisy copies of x."""
    with torch.no_grad():
        counts = np.zeros(num_classes, dtype=int)
        remaining = num
        while remaining > 0:
            this_batch_size = min(batch_size, remaining)
            remaining -= this_batch_size
            batch = x.repeat((this_batch_size, 1, 1, 1))
            noise = torch.randn_like(batch) * sigma
            predictions = model(batch + noise).argmax(1)
            counts += np.bincount(predictions.cpu().numpy(), minlength=num_classes)
        return counts


def cohen_certify(model, x, sigma, n0, n, alpha, batch_size) -> tuple[int, float]:
    """locuslab/smoothing core.py ``Smooth.certify`` (the same Clopper–Pearson bound as arqc)."""
    c_hat = int(cohen_sample_noise(model, x, n0, batch_size, sigma).argmax())
    counts = cohen_sample_noise(model, x, n, batch_size, sigma)
    p_lower = lower_confidence_bound(int(counts[c_hat]), n, alpha)
    return (ABSTAIN, 0.0) if p_lower < 0.5 else (c_hat, sigma * float(norm.ppf(p_lower)))


# --- helpers ------------------------------------------------------------------------------------------------


def fp32_onnx(gm) -> bytes:
    sim = simulate(apply_policy(gm, uniform(gm, 32, 32)), [torch.zeros(1, 3, 32, 32)])
    return lower(sim, {}).SerializeToString()


def w8a8_onnx(gm, train, sigma: float, num: int = 512) -> bytes:
    """W8A8 (per-channel weights, per-tensor activations) calibrated on training images with N(0, σ²) noise,
    the inputs a smoothed classifier sees (clean ranges clip noisy activations: ~30% disagreement at 0.5)."""
    g = torch.Generator().manual_seed(0)
    batches = [x + sigma * torch.randn(x.shape, generator=g) for x, _ in train.subset(num=num).batches(128)]
    return lower(simulate(apply_policy(gm, uniform(gm, 8, 8)), batches), {}).SerializeToString()


def peak_gflops(size: int = 2048, reps: int = 8) -> float:
    """The best rate of ``reps`` float32 size³ matrix products (GFLOP/s)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)
    best = min(_timed(lambda: torch.matmul(a, b)) for _ in range(reps))
    return 2 * size**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def acr(labels, predictions, radii) -> float:
    return summarize(list(zip(labels, predictions, radii, strict=True))).acr


# --- 3. full RS of f' with growing n, on nested noise streams -----------------------------------------------


def full_rs_ladder(backend: Backend, x: np.ndarray, y: list[int], ids: list[int], target: float, *,
                   sigma: float, n0: int, alpha: float, n_max: int, seed: int) -> list[tuple[int, float]]:
    """(n, ACR of CERTIFY(n0, n) over all points) for n = 100, 200, ... until ACR >= target or n = n_max.
    The first n samples of a noise stream are the same for every larger n, so one pass of growing blocks gives
    CERTIFY at each n."""
    seeds = [point_seed(seed, i) for i in ids]
    top = [int(np.bincount(sample_predictions(backend, xi, sigma, n0, n0, s, Phase.SELECTION)).argmax())
           for xi, s in zip(x, seeds, strict=True)]
    hits = np.zeros(len(ids), int)
    ladder = []
    for block in range(n_max // NOISE_BLOCK):
        for j, (xi, s) in enumerate(zip(x, seeds, strict=True)):
            noisy = torch.from_numpy(xi) + noise_block(s, Phase.ESTIMATION, block, xi.shape, sigma)
            hits[j] += int(np.sum(backend.predict(noisy.numpy()) == top[j]))
        n = (block + 1) * NOISE_BLOCK
        bounds = [lower_confidence_bound(int(h), n, alpha) for h in hits]
        predictions = [c if p > 0.5 else ABSTAIN for c, p in zip(top, bounds, strict=True)]
        radii = [sigma * float(norm.ppf(p)) if p > 0.5 else 0.0 for p in bounds]
        ladder.append((n, acr(y, predictions, radii)))
        if ladder[-1][1] >= target:
            break
    return ladder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--quick", action="store_true", help="fewer images and samples (a smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="threads of torch and onnxruntime")
    parser.add_argument("--irs-model", default=str(ROOT / "examples" / "models" / "resnet20_cifar10_sigma050.pt"),
                        help="model for part 3 (IRS at sigma = 0.5); default: the shipped noise-trained one")
    parser.add_argument("--irs-images", type=int, default=8, help="test images of part 3")
    parser.add_argument("--irs-n", type=int, default=4000, help="samples per image of the FP32 IRS cache")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    threads = args.threads
    data = Path(args.data_root)
    quick = args.quick
    torch.manual_seed(0)

    model = archs.build("resnet20")
    state = torch.load(data / WEIGHTS, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
    model.eval()
    gm = prepare_model(str(data / WEIGHTS), "resnet20").gm
    test = load_images(f"npz:{data / TEST}")
    macs = profile(gm).total_macs
    print(f"ResNet-20 (akamaster weights), {macs / 1e6:.2f}M MACs/sample; torch {torch.__version__}; "
          f"{threads} thread(s) on {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")

    # 1 + 2: throughput of CERTIFY --------------------------------------------------------------------------
    sigma, n0, n, alpha, batch = 0.25, 100, (300 if quick else 500), 0.001, 400
    images = test.subset(num=2)
    x = images.x.numpy()
    per_run = len(x) * (n0 + n)
    fp32 = fp32_onnx(gm)
    contenders = {
        f"Cohen-style PyTorch eager loop (batch {batch})":
            lambda: [cohen_certify(model, torch.from_numpy(xi), sigma, n0, n, alpha, batch) for xi in x],
    }
    backends = {f"arqc torch, folded graph (batch {batch})": TorchBackend(gm, batch_size=batch, device="cpu")}
    for b in (100, 400):
        backends[f"arqc onnxruntime FP32, ENABLE_ALL (batch {b})"] = OrtBackend(fp32, batch_size=b,
                                                                                intra_op_threads=threads)
    w8a8_name = f"arqc onnxruntime W8A8 integer kernels (batch {batch})"
    w8a8 = w8a8_onnx(gm, load_images(f"npz:{data / TRAIN}"), sigma)
    backends[w8a8_name] = OrtBackend(w8a8, batch_size=batch, intra_op_threads=threads)
    ov_name = f"arqc OpenVINO W8A8 int8 kernels (batch {batch})"
    try:  # the same file in OpenVINO's CPU plugin (extra arqc[openvino])
        backends[ov_name] = OpenVinoBackend(w8a8, batch_size=batch, threads=threads)
    except ArqcError as err:
        print(f"(no OpenVINO column: {err})")
    for name, backend in backends.items():
        contenders[name] = lambda backend=backend: [
            certify(backend, xi, sigma, n0, n, alpha, backend.batch_size, seed=i) for i, xi in enumerate(x)]
    print(f"\n[throughput] CERTIFY of {len(x)} CIFAR-10 test images, sigma={sigma} n0={n0} n={n} "
          f"alpha={alpha}: {per_run} samples per run, best of {2 if quick else 3} interleaved rounds")
    best = dict.fromkeys(contenders, float("inf"))
    with torch.inference_mode():
        for _ in range(2 if quick else 3):
            for name, run in contenders.items():
                best[name] = min(best[name], _timed(run))
    rates = {name: per_run / t for name, t in best.items()}
    baseline_name = next(iter(rates))
    for name, rate in rates.items():
        print(f"  {name:<52} {rate:8.0f} samples/s")
    arqc_name = max((k for k in rates if k not in (baseline_name, w8a8_name, ov_name)), key=rates.get)  # best FP32
    speedup = rates[arqc_name] / rates[baseline_name]
    w8a8_speedup = rates[w8a8_name] / rates[baseline_name]

    peak = peak_gflops()
    bound = peak * 1e9 / (2 * macs)
    print(f"\n[FLOP bound] peak float32 torch.matmul 2048^3 on {threads} thread(s): {peak:.1f} GFLOP/s; "
          f"2 x {macs / 1e6:.2f}M MACs = {2 * macs / 1e6:.1f} MFLOP/sample -> bound {bound:.0f} samples/s")

    # 3: IRS vs full RS for W8A8 at sigma = 0.5 -------------------------------------------------------------
    sigma, n0, n_cache, seed = 0.5, 100, (1000 if quick else args.irs_n), 0
    irs_images = test.subset(num=6 if quick else args.irs_images)
    if Path(args.irs_model).is_file():
        gm = prepare_model(args.irs_model).gm
        fp32 = fp32_onnx(gm)
        print(f"\n[IRS] model {args.irs_model} (trained with noise at sigma=0.5)")
    x, y, ids = irs_images.x.numpy(), [int(v) for v in irs_images.y], [int(i) for i in irs_images.ids]
    ort_batch = int(arqc_name.split("batch ")[1].rstrip(")")) if "onnxruntime" in arqc_name else 100
    f = OrtBackend(fp32, batch_size=ort_batch, intra_op_threads=threads)
    f_q = OrtBackend(w8a8_onnx(gm, load_images(f"npz:{data / TRAIN}"), sigma), batch_size=ort_batch,
                     intra_op_threads=threads)
    print(f"[IRS] W8A8 ResNet-20 (activations calibrated on 512 training images + N(0, sigma^2) noise) at "
          f"sigma={sigma}, alpha={alpha}, n0={n0}, {len(ids)} test images (ids {ids[0]}-{ids[-1]})")
    start = time.perf_counter()
    cache = build_cache(f, x, np.array(y), ids, sigma=sigma, n0=n0, n=n_cache, alpha=alpha,
                        batch_size=ort_batch, seed=seed)
    fp_acr = acr(y, [p.top_class if p.pA_lower > 0.5 else ABSTAIN for p in cache.points],
                 [p.radius for p in cache.points])
    print(f"  FP32 CERTIFY n={n_cache} (the IRS cache, {time.perf_counter() - start:.0f} s): "
          f"ACR {fp_acr:.3f}")
    irs = {}
    for n_prime in (n_cache // 20, n_cache // 10, n_cache // 4):
        certs = [certify_incremental(f_q, xi, cache.point(i), sigma=sigma, alpha=alpha, n_prime=n_prime,
                                     batch_size=ort_batch) for xi, i in zip(x, ids, strict=True)]
        irs[n_prime] = (acr(y, [c.prediction for c in certs], [c.radius for c in certs]),
                        sum(c.path == "irs" for c in certs), sum(c.disagreements or 0 for c in certs))
    start = time.perf_counter()
    ladder = full_rs_ladder(f_q, x, y, ids, max(max(a for a, _, _ in irs.values()), 1e-9), sigma=sigma, n0=n0,
                            alpha=alpha, n_max=2 * n_cache, seed=seed + 1)
    step = max(1, len(ladder) // 8)
    print(f"  W8A8 full RS on nested streams up to n={ladder[-1][0]} ({time.perf_counter() - start:.0f} s): "
          + ", ".join(f"n={n_} ACR {a:.3f}" for n_, a in ladder[step - 1 :: step]))
    ratios = []
    for n_prime, (irs_acr, on_irs, k) in irs.items():
        n_full = next((n_ for n_, a in ladder if a >= irs_acr), None)
        text = (f"  IRS n'={n_prime:>5}: ACR {irs_acr:.3f} ({on_irs} of {len(ids)} points by IRS, {k} "
                "W8A8/FP32 disagreements); ")
        if irs_acr == 0:
            print(text + "no point certified correctly: no comparison")
            continue
        if n_full is None:
            print(text + f"full RS does not reach it with n <= {ladder[-1][0]}")
            continue
        ratios.append((n_prime / (n0 + n_full), n_prime, n_full))
        print(text + f"full RS reaches it at n0+n = {n0}+{n_full} -> IRS/full samples "
              f"{n_prime / (n0 + n_full):.2f}")

    print("\n[summary]")
    print(f"  arqc W8A8 in onnxruntime / Cohen-style eager FP32 loop: {w8a8_speedup:.2f}x   (target >= 3)")
    if ov_name in rates:
        print(f"  arqc W8A8 in OpenVINO / Cohen-style eager FP32 loop:    "
              f"{rates[ov_name] / rates[baseline_name]:.2f}x")
    print(f"  arqc best FP32 backend / Cohen-style eager loop: {speedup:.2f}x   ({arqc_name}; target >= 3)")
    print(f"  arqc best FP32 backend / FLOP bound:             {rates[arqc_name] / bound:.2f}    (target >= 0.8)")
    if ratios:
        print("  IRS samples / full-RS samples at equal ACR: "
              + ", ".join(f"{r:.2f} (n'={n_prime} vs n0+n={n0}+{n_full})" for r, n_prime, n_full in ratios)
              + "   (target <= 0.33)")
    else:
        print("  IRS samples / full-RS samples at equal ACR: not reached (see above)")


if __name__ == "__main__":
    main()
