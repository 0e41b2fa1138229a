"""FP32 vs uniform vs random vs HAQ vs greedy vs ARQ on a noise-trained ResNet-20, at two BitOps budgets.

Search images come from the training split; every row's final numbers come from a fresh CERTIFY (same test
images, n, n0, α, σ and seeds for every row) of the compiled ONNX model in onnxruntime — FP32 is the
unquantized model in torch. Writes a markdown table (and the per-run report JSON files).

    python examples/arq_experiment.py --model examples/models/resnet20_cifar10_sigma025.pt \
        --train npz:../shared/data/cifar10/train_first2000_lossless.npz \
        --test npz:../shared/data/cifar10/test_first1000_lossless.npz --out examples/results/arq_cifar10.md

Every run keeps its stages in --workdir, so rerunning the same command resumes where it stopped; a row whose
report.json is there (written when the row finished) is not run again, so copying a work directory's small files
(args.json, policy.json, report.json, and fp32/) is enough to carry finished rows over to another machine.
A method whose search ends on the policy an earlier row of the same budget already has (e.g. ARQ keeping the greedy
demonstration) shares that row's QAT and certificate: both depend only on the policy and the seeds, so running
them again would give the same numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from arqc.arq import Run, search_samples
from arqc.base import ArqcError, atomic_write, write_json
from arqc.data import load_images
from arqc.passes.policy import policy_to_json
from arqc.passes.search.loop import chosen
from arqc.pipeline import prepare_model
from arqc.runtime.cluster import RayPool, pool_for
from arqc.settings import CALIBRATIONS, QAT_BN, QAT_SCALES, SearchSettings

RADII = ("0.00", "0.25", "0.50", "0.75", "1.00")  # keys of arqc.runtime.run results


def main() -> None:
    try:
        experiment()
    except ArqcError as err:  # bad input: one line, exit 2 (the table is only ever written whole)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def experiment() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--train", required=True, help="data spec of training images (calibration, search, QAT)")
    p.add_argument("--test", required=True, help="data spec of test images (final certificates)")
    p.add_argument("--out", required=True, help="markdown file to write")
    p.add_argument("--workdir", default="out/arq_experiment")
    p.add_argument("--sigma", type=float, default=0.25)
    p.add_argument("--budgets", default="1.5625%,3.125%")
    p.add_argument("--methods", default="uniform,random,haq,greedy,arq")
    p.add_argument("--episodes", type=int, default=60)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--search-images", type=int, default=100)
    p.add_argument("--cache-n", type=int, default=2000)
    p.add_argument("--search-n", type=int, default=500)
    p.add_argument("--refine-images", type=int, default=0,
                   help="adaptive reward precision: score the best candidates again on this many more training images")
    p.add_argument("--refine-top", type=int, default=SearchSettings.refine_top,
                   help="how many of the best distinct candidates --refine-images scores")
    p.add_argument("--test-images", type=int, default=1000)
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--n0", type=int, default=100)
    p.add_argument("--alpha", type=float, default=0.001)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--finetune-data", help="data spec of the QAT images [default: --train]")
    p.add_argument("--episode-finetune-epochs", type=int, default=0,
                   help="fine-tune every search candidate (HAQ) on the --train images outside the search split")
    p.add_argument("--calib-images", type=int, default=256, help="training images that calibrate the ranges")
    p.add_argument("--calibration", choices=CALIBRATIONS, default=SearchSettings.calibration,
                   help="how clipping ranges are chosen (arqc compile --calibration)")
    p.add_argument("--qat-scales", choices=QAT_SCALES, default=SearchSettings.qat_scales,
                   help="QAT with fixed or learned (LSQ) scales (arqc compile --qat-scales)")
    p.add_argument("--qat-distill", type=float, default=SearchSettings.qat_distill,
                   help="weight of distillation from the FP32 model in the QAT loss (arqc compile --qat-distill)")
    p.add_argument("--lr", type=float, default=SearchSettings.lr, help="QAT learning rate (arqc compile --lr)")
    p.add_argument("--qat-bn", choices=QAT_BN, default=SearchSettings.qat_bn,
                   help="QAT of weights with a folded BatchNorm (arqc compile --qat-bn)")
    p.add_argument("--qat-scale-lr", type=float, help="LSQ's learning rate (arqc compile --qat-scale-lr)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ray", nargs="?", const="auto", metavar="ADDRESS",
                   help="run the rows side by side on a Ray cluster (extra arqc[ray]): auto (the default of a bare "
                   "--ray), local or HOST:PORT; the FP32 stages' points run there too")
    p.add_argument("--ray-workers", type=int, help="rows running at once [default: the cluster's CPUs]")
    p.add_argument("--table-only", action="store_true",
                   help="rebuild --out from the reports already in --workdir; run nothing")
    args = p.parse_args()
    if args.table_only:
        rows = [(b, m, json.loads(path.read_text())) for b in args.budgets.split(",") for m in args.methods.split(",")
                if (path := row_dir(args, b, m) / "report.json").is_file()]
        if not rows:
            raise ArqcError(f"no report.json under {args.workdir}: run the experiment first")
        write_table(args, rows, rows[0][2]["fp32"])
        return

    train, test = load_images(args.train), load_images(args.test)
    finetune = load_images(args.finetune_data) if args.finetune_data else None
    prep = prepare_model(args.model, images=train)
    base = SearchSettings(sigma=args.sigma, episodes=args.episodes, warmup=args.warmup,
                          search_images=args.search_images, cache_n=args.cache_n, search_n=args.search_n,
                          refine_images=args.refine_images, refine_top=args.refine_top,
                          n0=args.n0, n=args.n, alpha=args.alpha, finetune_epochs=args.finetune_epochs,
                          test_images=args.test_images, seed=args.seed, calib_images=args.calib_images,
                          episode_finetune_epochs=args.episode_finetune_epochs, calibration=args.calibration,
                          qat_scales=args.qat_scales, qat_distill=args.qat_distill, lr=args.lr,
                          qat_bn=args.qat_bn, qat_scale_lr=args.qat_scale_lr)
    with pool_for(args.ray, args.ray_workers) as pool:
        run_rows(args, (prep, train, test, finetune), base, pool)


def run_rows(args: argparse.Namespace, inputs: tuple, base: SearchSettings, pool: RayPool | None) -> None:
    """Every row: the FP32 stages the rows share first (their points on ``pool`` if given), then every row's
    search, then QAT and certificates once per distinct (budget, policy); with ``pool`` the searches, and then
    the QAT runs, are spread over the Ray workers, each row on one worker. Writes each row's report.json and
    the table as rows finish, in the table's order."""
    prep, train, test, finetune = inputs
    plan = [(budget, method, replace(base, method=method, budget=float(budget.rstrip("%")) / 100))
            for budget in args.budgets.split(",") for method in args.methods.split(",")]
    fp32_dir = Path(args.workdir) / "fp32"

    def stages(budget: str, method: str, settings: SearchSettings, driver_pool: RayPool | None = None) -> Run:
        return Run(prep, train, test, settings, row_dir(args, budget, method), resume=True, fp32_dir=fp32_dir,
                   finetune=finetune, pool=driver_pool)

    finished = {(b, m): json.loads(path.read_text()) for b, m, _ in plan
                if (path := row_dir(args, b, m) / "report.json").is_file()}
    todo = [row for row in plan if row[:2] not in finished]
    # the FP32 stages that the rows to run share: here, before those rows run side by side
    if any(method == "arq" for _, method, _ in todo):
        stages(*next(row for row in todo if row[1] == "arq"), pool).fp32_cache()
    if todo:
        stages(*todo[0], pool).fp32_certificate()
    shared = inputs if pool is None else tuple(pool.put(value) for value in inputs)
    if pool is not None:
        print(f"{len(todo)} rows to run, side by side on {pool.workers} Ray workers", flush=True)
    jobs = [(row_policy, *shared, settings, str(row_dir(args, b, m)), str(fp32_dir)) for b, m, settings in todo]
    searched = dict(zip([row[:2] for row in todo], _each(pool, jobs), strict=True))

    def key(budget: str, method: str) -> tuple[str, str]:
        policy = finished[budget, method]["policy"] if (budget, method) in finished else \
            policy_to_json(searched[budget, method][0])
        return budget, json.dumps(policy, sort_keys=True)

    first: dict[tuple[str, str], tuple[str, str]] = {}  # (budget, policy) -> the row that fine-tunes and certifies it
    for budget, method, _ in plan:
        if (budget, method) in finished and "shared_with" in finished[budget, method]:
            continue
        first.setdefault(key(budget, method), (budget, method))
    owners = [row for row in todo if first[key(*row[:2])] == row[:2]]
    compile_settings = prep.settings(purpose="experiment")
    jobs = [(row_report, *shared, settings, str(row_dir(args, b, m)), str(fp32_dir), compile_settings)
            for b, m, settings in owners]
    reports = dict(finished) | dict(zip([row[:2] for row in owners], _each(pool, jobs), strict=True))
    rows, fp32 = [], None
    for budget, method, _ in plan:
        report = reports.get((budget, method))
        if report is None:  # the same QAT (seed, data) and certificate (seeds, images) as that row: reuse them
            owner = first[key(budget, method)]
            policy, episodes, search_s = searched[budget, method]
            report = reports[owner] | {"method": method, "episodes": episodes, "shared_with": owner[1],
                                       "timings_s": {"search": search_s}, "search_samples": search_samples(episodes)}
        if (budget, method) not in finished:
            write_json(row_dir(args, budget, method) / "report.json", report)
        fp32 = fp32 or report["fp32"]
        rows.append((budget, method, report))
        print(f"{budget} {method}: ACR {report['acr']:.3f} (FP32 {report['fp32']['acr']:.3f})", flush=True)
        write_table(args, rows, fp32)


def _each(pool: RayPool | None, jobs: list[tuple]):
    """``function(*args)`` of every job (function, *args), in order: here one after another, or side by side
    on the pool's workers."""
    if pool is None:
        return (function(*args) for function, *args in jobs)
    return pool.map(None, jobs)


def row_policy(prep, train, test, finetune, settings: SearchSettings, workdir: str, fp32_dir: str):
    """One row's search (resumed from its work directory): the policy, the episodes and the search's seconds."""
    run = Run(prep, train, test, settings, Path(workdir), resume=True, progress=False, fp32_dir=Path(fp32_dir),
              finetune=finetune)
    policy, episodes = run.policy()
    return policy, episodes, run.timings.get("search", 0.0)


def row_report(prep, train, test, finetune, settings: SearchSettings, workdir: str, fp32_dir: str, compile_settings):
    """One row's QAT, lowering and certificates (after its search): the report."""
    run = Run(prep, train, test, settings, Path(workdir), resume=True, progress=False, fp32_dir=Path(fp32_dir),
              finetune=finetune)
    return run.run(compile_settings)[1]


def row_dir(args: argparse.Namespace, budget_text: str, method: str) -> Path:
    """The work directory of one row (one method at one budget)."""
    return Path(args.workdir) / f"{method}_{budget_text.rstrip('%')}"


def write_table(args: argparse.Namespace, rows: list[tuple[str, str, dict]], fp32: dict) -> None:
    c = rows[0][2]["certification"]
    lines = [f"# ARQ vs baselines: {Path(args.model).name}, σ = {args.sigma}", "",
             f"Certified accuracy (%) at L2 radius r and ACR on {c['num_images']} test images of `{args.test}`; "
             f"n = {c['n']}, n0 = {c['n0']}, α = {c['alpha']}, σ = {c['sigma']}, the same seeds for every row. "
             "Quantized rows: the compiled ONNX model in onnxruntime (ENABLE_ALL); FP32: the model in torch. "
             f"Search: {args.episodes} episodes ({args.warmup} warm-up), {args.search_images} search images from "
             f"`{args.train}`, IRS n' = {args.search_n} against an FP32 cache of n = {args.cache_n}"
             + (f" (the best {args.refine_top} candidates scored again on {args.refine_images} more images)"
                if args.refine_images else "") + "; "
             f"QAT {args.finetune_epochs} epoch(s) on `{args.finetune_data or args.train}` "
             "(noise σ; crops and flips for colour images, as `arqc train`), "
             f"{'learned (LSQ)' if args.qat_scales == 'lsq' else 'fixed'} scales"
             + (f" (learning rate {args.qat_scale_lr})" if args.qat_scales == "lsq" and args.qat_scale_lr else "")
             + f", {args.qat_bn} BatchNorm, learning rate {args.lr}"
             + (f", distilled from FP32 (weight {args.qat_distill})" if args.qat_distill else "")
             + f"; {args.calibration} calibration "
             f"on {args.calib_images} images. "
             "First and last layer fixed at 8 bits. ARQ and HAQ play the "
             f"sensitivity-greedy policy in the last warm-up episode ({max(args.warmup - 1, 0)}, a demonstration) and "
             "explore around it; \"chosen episode\" is the episode whose policy won the search.", "",
             "| budget | method | BitOps % FP32 | " + " | ".join(f"r={r}" for r in RADII)
             + " | ACR | chosen episode | search s |",
             "|---|---|---|" + "---|" * len(RADII) + "---|---|---|",
             "| — | FP32 | 100 | " + " | ".join(f"{100 * fp32['certified_accuracy'][r]:.1f}" for r in RADII)
             + f" | {fp32['acr']:.3f} | | |"]
    for budget_text, method, r in rows:
        chosen_episode = chosen(r["episodes"])["episode"] if r["episodes"] else "—"
        label = method + (f" (= {r['shared_with']}'s policy)" if "shared_with" in r else "")
        lines.append(f"| {budget_text} | {label} | {100 * r['bitops_ratio_fp32']:.3f} | "
                     + " | ".join(f"{100 * r['certified_accuracy'][x]:.1f}" for x in RADII)
                     + f" | {r['acr']:.3f} | {chosen_episode} | {r['timings_s'].get('search', 0):.0f} |")
    lines += policy_tables(rows)
    # a rerunnable command: options left at no value (None) are left out, as is the --table-only switch
    options = {k: v for k, v in vars(args).items() if k != "table_only" and v is not None}
    text = "\n".join(lines) + "\n\nCommand: `python examples/arq_experiment.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in options.items()) + "`\n"
    atomic_write(args.out, lambda f: f.write(text.encode()))


def policy_tables(rows: list[tuple[str, str, dict]]) -> list[str]:
    """Per budget, every method's bits per layer (w/a) and each layer's share of the FP32 MACs."""
    lines = []
    for budget in dict.fromkeys(b for b, _, _ in rows):
        reports = [(m, r) for b, m, r in rows if b == budget]
        layers = reports[0][1]["layers"]
        macs = sum(layer["macs"] for layer in layers)
        lines += ["", f"Bits per layer (weights/activations) at {budget}:", "",
                  "| layer | MACs % | " + " | ".join(m for m, _ in reports) + " |",
                  "|---|---|" + "---|" * len(reports)]
        for layer in layers:
            name = layer["name"]
            lines.append(f"| {name} | {100 * layer['macs'] / macs:.1f} | " + " | ".join(
                f"{r['policy'][name]['w_bits']}/{r['policy'][name]['a_bits']}" for _, r in reports) + " |")
    return lines


if __name__ == "__main__":
    main()
