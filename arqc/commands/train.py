"""``arqc train``: Gaussian-noise training of a smoothing base classifier, saved as an arqc checkpoint
(arqc/train.py), or QA-IBP training of a quantized network, written as the QDQ ONNX model it trains
(arqc/qaibp.py; weights and scales as trained, so ``arqc certify --method ibp`` reads it back)."""

from __future__ import annotations

import shlex
import sys

import click
import torch

from arqc.augment import AUGMENTS
from arqc.base import ArqcError, atomic_write
from arqc.commands.options import bits_options, parse_epsilon
from arqc.data import load_images
from arqc.pipeline import prepare_model, resolve_policy, to_onnx
from arqc.qaibp import train_qaibp
from arqc.train import SCHEDULES, TrainConfig, prepare_training, resume_path, train


@click.command(name="train")
@click.option("--arch", required=True,
              help="Architecture: a built-in name (resnet20, mnist_cnn, ...) or package.module:factory.")
@click.option("--data", required=True, help="Training images, e.g. imagefolder:DIR/train or mnist:DIR:train.")
@click.option("--method", type=click.Choice(["gaussian", "qa-ibp"]), default="gaussian", show_default=True,
              help="gaussian: noise augmentation for smoothing (--sigma); qa-ibp: certified training of the "
              "quantized network (--epsilon, --bits/--policy), written as ONNX.")
@click.option("--sigma", type=float, help="Noise std in [0, 1] pixel units (certify with the same).")
@click.option("--epsilon", help="qa-ibp: L-inf radius to train for (e.g. 0.1 or 26/255).")
@bits_options("qa-ibp: ")
@click.option("--kappa-end", type=float, default=0.5, show_default=True,
              help="qa-ibp: final weight of the natural loss.")
@click.option("--epochs", required=True, type=int, help="Number of passes over the training images.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The checkpoint to write.")
@click.option("--init", type=click.Path(dir_okay=False),
              help="Start from these weights: an arqc checkpoint or a state_dict (akamaster's as they are).")
@click.option("--lr", default=0.1, show_default=True, type=float, help="Peak learning rate.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default="cosine", show_default=True,
              help="Per-step learning-rate schedule.")
@click.option("--batch-size", default=128, show_default=True, type=int)
@click.option("--momentum", default=0.9, show_default=True, type=float)
@click.option("--weight-decay", default=1e-4, show_default=True, type=float)
@click.option("--augment", type=click.Choice(AUGMENTS), default="auto", show_default=True,
              help="auto: random crop + flip for 3-channel images, nothing for 1-channel ones.")
@click.option("--exclude", multiple=True,
              help="Drop every training image whose pixels equal one in this data spec (repeatable).")
@click.option("--val", help="Data spec to report clean and noisy base accuracy on after each epoch.")
@click.option("--test-data", help="Held-out test images: excluded from training (as --exclude) and recorded in the "
              "checkpoint with --data, so that `arqc compile MODEL -o OUT --sigma S` finds both.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seeds the init, order, crops and noise.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from OUTPUT.resume.")
@click.option("--device", help="cpu or cuda[:N] (default: cuda when available, else cpu).")
@click.option("--threads", type=int, help="CPU threads for torch (default: torch's choice).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train_cmd(arch, data, method, sigma, epsilon, bits, w_bits, a_bits, policy_path, kappa_end, epochs, output,
              init, lr, schedule, batch_size, momentum, weight_decay, augment, exclude, val, test_data, seed, resume,
              device, threads, no_progress):
    """Train ARCH on DATA with Gaussian noise of std SIGMA (checkpoint every epoch, resumable), or with
    QA-IBP at a fixed precision (--method qa-ibp)."""
    if threads is not None:
        if threads < 1:
            raise ArqcError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    if method == "qa-ibp":
        if sigma is not None or resume or exclude or val or test_data:
            raise ArqcError("--sigma, --resume, --exclude, --val and --test-data belong to --method gaussian")
        return _train_qaibp(arch=arch, data=data, epsilon=epsilon, bits=bits, w_bits=w_bits, a_bits=a_bits,
                            policy_path=policy_path, kappa_end=kappa_end, epochs=epochs, output=output, init=init,
                            lr=lr, batch_size=batch_size, seed=seed, device=device)
    if sigma is None:
        raise ArqcError("--method gaussian needs --sigma (the noise std the smoothed classifier will use)")
    if epsilon or bits or w_bits or a_bits or policy_path:
        raise ArqcError("--epsilon and --bits/--policy belong to --method qa-ibp")
    cfg = TrainConfig(arch=arch, data=data, sigma=sigma, epochs=epochs, output=output, init=init, lr=lr,
                      schedule=schedule, batch_size=batch_size, momentum=momentum, weight_decay=weight_decay,
                      augment=augment, exclude=list(exclude), val=val, seed=seed, test_data=test_data,
                      command=shlex.join(["arqc", *sys.argv[1:]]))
    prep = prepare_training(cfg)
    for e in prep.excluded:
        click.echo(f"excluded {e['removed_from_training']} training images matching {e['spec']} "
                   f"({e['matched']} matches, {e['images']} images there)")
    click.echo(f"training {arch} on {len(prep.train)} images of {data}, sigma={sigma}, {epochs} epochs; "
               f"resume file {resume_path(output)}")
    card = train(prep, resume=resume, device=device, progress=not no_progress, log=click.echo)
    acc = "  ".join(f"{k} {100 * v:.2f}%" for k, v in card["final_accuracy"].items())
    click.echo(f"wrote {output} ({acc})")


def _train_qaibp(*, arch, data, epsilon, bits, w_bits, a_bits, policy_path, kappa_end, epochs, output, init,
                 lr, batch_size, seed, device) -> None:
    """Train a quantized network with QA-IBP at a fixed precision and write it as QDQ ONNX."""
    if epsilon is None:
        raise ArqcError("--method qa-ibp needs --epsilon (the L-inf radius to train for, e.g. 0.1)")
    if not output.endswith(".onnx"):
        raise ArqcError(f"--method qa-ibp writes the trained quantized network as ONNX: give -o {output}.onnx")
    if bits is None and w_bits is None and a_bits is None and policy_path is None:
        raise ArqcError("--method qa-ibp trains a quantized network: give --bits B, --w-bits/--a-bits or --policy")
    eps = parse_epsilon(epsilon)
    images = load_images(data)
    prep = prepare_model(init, arch, images=images)
    policy = resolve_policy(prep.gm, bits, w_bits, a_bits, policy_path, default=32)
    click.echo(f"QA-IBP training of {arch} on {len(images)} images of {data}: epsilon={eps:g}, {epochs} epochs")
    sim, history = train_qaibp(prep.gm, images, eps, epochs, policy, kappa_end=kappa_end, lr=lr,
                               batch_size=batch_size, seed=seed, device=device,
                               log=lambda r: click.echo(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else
                                                                 f"{k}={v}" for k, v in r.items())))
    # the trained network is not a quantization of the init's weights: no base fingerprint (IRS origin)
    settings = prep.settings(source=init, base_fingerprint=None, scales="float", calibration_data=data,
                             command=shlex.join(["arqc", *sys.argv[1:]]),
                             training={"method": "qa-ibp", "epsilon": eps, "epochs": epochs, "kappa_end": kappa_end,
                                       "lr": lr, "seed": seed, "history": history})
    model = to_onnx(sim.cpu(), settings)
    atomic_write(output, lambda f: f.write(model.SerializeToString()))
    click.echo(f"wrote {output}")
