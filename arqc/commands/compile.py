"""``arqc compile``: quantize a model at a fixed precision or under a BitOps budget (the ARQ search), lower it
to QDQ ONNX, and with --sigma certify the written bytes first, in the runtime it is deployed to (--runtime)."""

from __future__ import annotations

import shlex
import sys

import click

from arqc import api
from arqc.base import ArqcError, atomic_write, write_json
from arqc.commands.options import (
    bits_options,
    certify_settings,
    certify_settings_options,
    model_options,
    parse_epsilon,
    parse_shape,
    ray_options,
)
from arqc.passes.quantize import SCALES
from arqc.passes.search.budget import parse_budget
from arqc.reports import format_compile_report, render_html
from arqc.settings import CALIBRATIONS, METHODS, QAT_BN, QAT_SCALES, SearchSettings

SEARCH = SearchSettings()  # the defaults of the search options


def search_options(f):
    """The options of ``arqc compile --budget`` (the ARQ search)."""
    d = SEARCH
    for decorator in reversed([
        click.option("--budget", help="BitOps budget as a share of FP32, e.g. 1.5%: search the precision."),
        click.option("--method", type=click.Choice(METHODS), default=d.method, show_default=True,
                     help="arq (certified reward), haq (accuracy reward), uniform, random, greedy."),
        click.option("--episodes", type=int, default=d.episodes, show_default=True),
        click.option("--warmup", type=int, default=d.warmup, show_default=True, help="Random episodes first."),
        click.option("--demo", type=click.Choice(["greedy", "none"]), default=d.demo, show_default=True,
                     help="arq/haq: demonstrate the sensitivity-greedy policy in the last warm-up episode "
                     "and explore around it."),
        click.option("--search-images", type=int, default=d.search_images, show_default=True,
                     help="Training images the search certifies (after the calibration images)."),
        click.option("--cache-n", type=int, default=d.cache_n, show_default=True,
                     help="FP32 samples per search image (the IRS cache)."),
        click.option("--search-n", type=int, default=d.search_n, show_default=True,
                     help="Samples of each candidate per search image (IRS n')."),
        click.option("--refine-images", type=int, default=d.refine_images, show_default=True,
                     help="Adaptive reward precision: score the --refine-top best candidates again on this many "
                     "more --data images (after the search images) and return the best of them (0 = off)."),
        click.option("--refine-top", type=int, default=d.refine_top, show_default=True,
                     help="How many of the best distinct candidates --refine-images scores again."),
        click.option("--lam", type=float, default=d.lam, show_default=True,
                     help="Weight of clean smoothed accuracy in the ARQ reward."),
        click.option("--finetune-epochs", type=int, default=d.finetune_epochs, show_default=True,
                     help="Noise-aware QAT epochs on --finetune-data."),
        click.option("--finetune-data", help="Training images for QAT, e.g. the whole training split "
                     "[default: --data]. Never the test images."),
        click.option("--episode-finetune-epochs", type=int, default=d.episode_finetune_epochs, show_default=True,
                     help="Fine-tune every search candidate for this many epochs (HAQ) on the --data images "
                     "outside the search split before scoring it (0 = off)."),
        click.option("--lr", type=float, default=d.lr, show_default=True, help="QAT learning rate."),
        click.option("--qat-scales", type=click.Choice(QAT_SCALES), default=d.qat_scales, show_default=True,
                     help="QAT with the scales as calibrated (fixed) or learned with them (lsq: learned "
                     "step sizes, exported exactly)."),
        click.option("--qat-distill", type=float, default=d.qat_distill, show_default=True,
                     help="Weight in [0, 1] of distillation from the FP32 model on the same noisy images in the "
                     "QAT loss (the rest is cross-entropy with the labels)."),
        click.option("--qat-bn", type=click.Choice(QAT_BN), default=d.qat_bn, show_default=True,
                     help="Train each weight with a folded BatchNorm as folded (folded) or with the steps of the "
                     "unfolded conv, its BatchNorm frozen (unfolded: --lr is then the training rate of the "
                     "unfolded weights)."),
        click.option("--qat-scale-lr", type=float, help="Learning rate of the learned scales of --qat-scales lsq "
                     "[default: --lr]."),
        click.option("--device", help="Where QAT, fine-tunes and the FP32 model's sampling run: cpu or cuda[:N] "
                     "[default: cuda when available]. Candidates run in onnxruntime on the CPU."),
        click.option("--workdir", help="Where the stages are kept [default: OUTPUT.arqc/]."),
        click.option("--resume", is_flag=True, help="Continue an interrupted run in --workdir."),
        click.option("--html", "html_path", type=click.Path(dir_okay=False), help="Write the HTML report."),
    ]):
        f = decorator(f)
    return f


@click.command(name="compile")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The ONNX file to write.")
@model_options
@bits_options()
@click.option("--data", help="Calibration images (clean training split), e.g. cifar10:DIR:train [default: the "
              "training images an arqc checkpoint records].")
@click.option("--calib-images", default=512, show_default=True, help="Images used for activation ranges.")
@click.option("--scales", type=click.Choice(SCALES), default="float", show_default=True,
              help="float: DESIGN's max scaling; po2: power-of-two scales, bit-exact across backends.")
@click.option("--calibration", type=click.Choice(CALIBRATIONS), default=SEARCH.calibration, show_default=True,
              help="How clipping ranges are chosen: minmax (the observed range), percentile (99.99th at each "
              "end), mse (least squared quantization error; weights per channel).")
@click.option("--int4-weights", is_flag=True, help="Store <=4-bit weights in native INT4 containers.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the compile report JSON.")
@click.option("--epsilon", help="Also certify the compiled model with interval bounds at this L-inf radius on "
              "--test-data (e.g. 2/255); the certificate goes into the report and the model's metadata.")
@click.option("--calib-sigma", type=float,
              help="Calibrate activation ranges on images with N(0, s^2) noise [default: --sigma, else 0].")
@certify_settings_options
@search_options
@ray_options
def compile_(model, output, arch, trust_pickle, input_shape, bits, w_bits, a_bits, policy_path, data,
             calib_images, scales, calibration, int4_weights, report_path, epsilon, calib_sigma, sigma, runtime,
             compare_runtime, verify, test_data,
             num_images, n, n0, alpha, max_disagreement, seed, budget, method, episodes, warmup, demo, search_images,
             cache_n, search_n, refine_images, refine_top, lam, finetune_epochs, finetune_data,
             episode_finetune_epochs, lr, qat_scales, qat_distill, qat_bn, qat_scale_lr, device, workdir,
             resume, html_path, ray_address, ray_workers, chunk):
    """Quantize MODEL and lower it to a QDQ ONNX model: at a fixed precision (--bits, --w-bits/--a-bits,
    --policy), or at the precision an ARQ search finds under a BitOps --budget (with --sigma and no precision
    given: at the default budget, 1.5625 %). An arqc checkpoint's recorded training and test images are the
    default --data and --test-data, so `arqc compile model.pt -o model.onnx --sigma 0.25` runs the whole search.

    With --sigma, the ONNX model is certified in --runtime (onnxruntime at ENABLE_ALL, or OpenVINO's CPU
    plugin) on --test-data and the certificate goes into the report and the model; with --verify, per-sample
    predictions of that runtime and the torch simulation on the same noise are compared too (and with
    --compare-runtime, those of a second runtime), and the model is written only if they disagree on at most
    --max-disagreement of the samples. Activation ranges are calibrated on --data images with noise at
    --calib-sigma, which defaults to --sigma: the inputs a smoothed classifier's base model sees.
    """
    precision = bits is not None or w_bits is not None or a_bits is not None or policy_path is not None
    if sigma is not None and budget is None and not precision:  # the headline: arqc compile MODEL -o OUT --sigma S
        budget = f"{100 * SEARCH.budget:g}%"
        click.echo(f"no precision given: searching (ARQ) for the most certified policy within {budget} of FP32 BitOps "
                   "(--budget B to change it, --bits B for a fixed precision)")
    check = certify_settings(sigma, verify, test_data, epsilon, num_images=num_images, n=n, n0=n0, alpha=alpha,
                             max_disagreement=max_disagreement, seed=seed, runtime=runtime,
                             compare_runtime=compare_runtime)
    search = None
    if budget is None:
        if resume or workdir or html_path:
            raise ArqcError("--resume, --workdir and --html belong to a search: add --budget")
    else:
        search = SearchSettings(method=method, budget=parse_budget(budget), episodes=episodes, warmup=warmup,
                                demo=demo, search_images=search_images, cache_n=cache_n, search_n=search_n,
                                refine_images=refine_images, refine_top=refine_top, lam=lam,
                                finetune_epochs=finetune_epochs, episode_finetune_epochs=episode_finetune_epochs,
                                lr=lr, qat_scales=qat_scales, qat_distill=qat_distill, qat_bn=qat_bn,
                                qat_scale_lr=qat_scale_lr, device=device)
        workdir = workdir or f"{output}.arqc"
    result = api.compile(model, data, arch=arch, input_shape=parse_shape(input_shape), trust_pickle=trust_pickle,
                         bits=bits, w_bits=w_bits, a_bits=a_bits, policy=policy_path,
                         budget=search.budget if search else None, search=search, certify=check,
                         test_images=test_data, epsilon=parse_epsilon(epsilon) if epsilon else None,
                         calib_images=calib_images, calib_sigma=calib_sigma, scales=scales, calibration=calibration,
                         int4_weights=int4_weights, finetune_images=finetune_data, workdir=workdir, resume=resume,
                         command=shlex.join(["arqc", *sys.argv[1:]]), progress=True, log=click.echo,
                         ray=ray_address, ray_workers=ray_workers, chunk=chunk)
    if search is not None:
        click.echo(format_compile_report(result.report))
    result.save(output)
    click.echo(f"wrote {output}: {result.size_line()}" + (f"; stages kept in {workdir}" if search is not None else ""))
    if report_path:
        write_json(report_path, result.report)
    if html_path:
        html = render_html(result.report)
        atomic_write(html_path, lambda f: f.write(html.encode()))
