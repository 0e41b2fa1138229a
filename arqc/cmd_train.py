"""``arqc train``: Gaussian-noise training of a smoothing base classifier, saved as an arqc checkpoint."""

from __future__ import annotations

import shlex
import sys

import click
import torch

from arqc.errors import ArqcError
from arqc.train import AUGMENTS, SCHEDULES, TrainConfig, prepare, resume_path, train


@click.command(name="train")
@click.option("--arch", required=True,
              help="Architecture: a built-in name (resnet20, mnist_cnn, ...) or package.module:factory.")
@click.option("--data", required=True, help="Training images, e.g. imagefolder:DIR/train or mnist:DIR:train.")
@click.option("--sigma", required=True, type=float,
              help="Noise std in [0, 1] pixel units (certify with the same).")
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
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seeds the init, order, crops and noise.")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from OUTPUT.resume.")
@click.option("--device", help="cpu or cuda[:N] (default: cuda when available, else cpu).")
@click.option("--threads", type=int, help="CPU threads for torch (default: torch's choice).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train_cmd(arch, data, sigma, epochs, output, init, lr, schedule, batch_size, momentum, weight_decay,
              augment, exclude, val, seed, resume, device, threads, no_progress):
    """Train ARCH on DATA with Gaussian noise of std SIGMA; checkpoint every epoch, resumable."""
    if threads is not None:
        if threads < 1:
            raise ArqcError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    cfg = TrainConfig(arch=arch, data=data, sigma=sigma, epochs=epochs, output=output, init=init, lr=lr,
                      schedule=schedule, batch_size=batch_size, momentum=momentum, weight_decay=weight_decay,
                      augment=augment, exclude=list(exclude), val=val, seed=seed,
                      command=shlex.join(["arqc", *sys.argv[1:]]))
    prep = prepare(cfg)
    for e in prep.excluded:
        click.echo(f"excluded {e['removed_from_training']} training images matching {e['spec']} "
                   f"({e['matched']} matches, {e['images']} images there)")
    click.echo(f"training {arch} on {len(prep.train)} images of {data}, sigma={sigma}, {epochs} epochs; "
               f"resume file {resume_path(output)}")
    card = train(prep, resume=resume, device=device, progress=not no_progress, log=click.echo)
    acc = "  ".join(f"{k} {100 * v:.2f}%" for k, v in card["final_accuracy"].items())
    click.echo(f"wrote {output} ({acc})")
