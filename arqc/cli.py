"""The ``arqc`` command line. Every user error is one line on stderr and exit status 2."""

from __future__ import annotations

import json
import shlex
import sys

import click

from arqc import __version__
from arqc.cmd_certify import verify_args, verify_options
from arqc.errors import ArqcError
from arqc.loading import atomic_write, write_json
from passes.analysis import format_profile, profile
from passes.policy import Policy, check_bits, load_policy, policy_to_json, uniform
from passes.quantize import SCALES


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise ArqcError(f"--input-shape {text!r} is not C,H,W (e.g. 3,32,32)") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ArqcError(f"--input-shape {text!r} is not C,H,W with positive sizes (e.g. 3,32,32)")
    return shape


def model_options(f):
    f = click.option("--input-shape", help="C,H,W when the arch does not say (e.g. 3,32,32).")(f)
    f = click.option("--trust-pickle", is_flag=True,
                     help="Allow a fully pickled nn.Module (runs code from the file).")(f)
    f = click.option("--arch", help="Architecture for state_dict files: a built-in name or package.module:factory.")(f)
    return f


def bits_options(f):
    f = click.option("--policy", "policy_path", type=click.Path(dir_okay=False),
                     help="JSON file: layer -> {w_bits, a_bits}.")(f)
    f = click.option("--a-bits", type=int, help="Uniform activation bits (2..8, 32 = float).")(f)
    f = click.option("--w-bits", type=int, help="Uniform weight bits (2..8, 32 = float).")(f)
    f = click.option("--bits", type=int, help="Uniform weight and activation bits (2..8, 32 = float).")(f)
    return f


def resolve_policy(gm, bits, w_bits, a_bits, policy_path, default: int) -> Policy:
    """The policy the bit options ask for; an unset --w-bits or --a-bits means ``default``."""
    if policy_path and (bits or w_bits or a_bits):
        raise ArqcError("give either --policy or --bits/--w-bits/--a-bits, not both")
    if policy_path:
        return load_policy(policy_path)
    if bits is not None and (w_bits is not None or a_bits is not None):
        raise ArqcError("give either --bits or --w-bits/--a-bits, not both")
    if bits is not None:
        w = a = check_bits(bits, "--bits")
    else:
        w = check_bits(w_bits if w_bits is not None else default, "--w-bits")
        a = check_bits(a_bits if a_bits is not None else default, "--a-bits")
    return uniform(gm, w, a)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="arqc")
def cli():
    """arqc: certifiably robust mixed-precision quantization, lowered to QDQ ONNX."""


@cli.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@model_options
@bits_options
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the profile as JSON.")
def analyze(model, arch, trust_pickle, input_shape, bits, w_bits, a_bits, policy_path, json_path):
    """Per-layer shapes, MACs, params and BitOps of MODEL (or of --arch with fresh weights)."""
    from arqc.pipeline import prepare
    from passes.policy import apply_policy

    prep = prepare(model, arch, trust_pickle, parse_shape(input_shape))
    apply_policy(prep.gm, resolve_policy(prep.gm, bits, w_bits, a_bits, policy_path, default=32))
    prof = profile(prep.gm)
    click.echo(format_profile(prof))
    if json_path:
        write_json(json_path, prof.to_json())


def search_options(f):
    """The options of ``arqc compile --budget`` (the ARQ search); collected into one ``search`` dict."""
    from arqc.arq import METHODS, SearchSettings

    d = SearchSettings()
    opts = [
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
                     help="Samples of each candidate per search image (IRS n').")
        ,
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
        click.option("--device", help="Where QAT, fine-tunes and the FP32 model's sampling run: cpu or cuda[:N] "
                     "[default: cuda when available]. Candidates run in onnxruntime on the CPU."),
        click.option("--workdir", help="Where the stages are kept [default: OUTPUT.arqc/]."),
        click.option("--resume", is_flag=True, help="Continue an interrupted run in --workdir."),
        click.option("--html", "html_path", type=click.Path(dir_okay=False), help="Write the HTML report."),
    ]
    names = ["budget", "method", "episodes", "warmup", "demo", "search_images", "cache_n", "search_n", "lam",
             "finetune_epochs", "finetune_data", "episode_finetune_epochs", "lr", "device", "workdir", "resume",
             "html_path"]

    def collect(**kwargs):
        search = {k: kwargs.pop(k) for k in names}
        return f(budget=search.pop("budget"), search=search, **kwargs)

    collect.__name__, collect.__doc__ = f.__name__, f.__doc__
    for opt in reversed(opts):
        collect = opt(collect)
    return collect


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--html", "html_path", type=click.Path(dir_okay=False), help="Also write the HTML page with plots.")
@click.option("--compare", multiple=True, type=click.Path(dir_okay=False),
              help="Report JSON of another run (a baseline) to plot next to this one; repeatable.")
def report(model, html_path, compare):
    """Rebuild the compile report of an ONNX model arqc compiled with --budget (from its metadata)."""
    from arqc.report import format_report, render_html, report_from_onnx

    data = report_from_onnx(model)
    click.echo(format_report(data))
    if html_path:
        others = []
        for path in compare:
            try:
                others.append(json.loads(open(path).read()))
            except (OSError, json.JSONDecodeError) as err:
                raise ArqcError(f"cannot read report {path}: {err}; give a report JSON from arqc compile") from None
        atomic_write(html_path, lambda f: f.write(render_html(data, others).encode()))
        click.echo(f"wrote {html_path}")


@cli.command(name="compile")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="The ONNX file to write.")
@model_options
@bits_options
@click.option("--data", help="Calibration images (clean training split), e.g. cifar10:DIR:train.")
@click.option("--calib-images", default=512, show_default=True, help="Images used for activation ranges.")
@click.option("--scales", type=click.Choice(SCALES), default="float", show_default=True,
              help="float: DESIGN's max scaling; po2: power-of-two scales, bit-exact across backends.")
@click.option("--int4-weights", is_flag=True, help="Store <=4-bit weights in native INT4 containers.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False),
              help="Write the compile report JSON.")
@click.option("--calib-sigma", type=float,
              help="Calibrate activation ranges on images with N(0, s^2) noise [default: --sigma, else 0].")
@verify_options
@search_options
def compile_(model, output, arch, trust_pickle, input_shape, bits, w_bits, a_bits, policy_path, data,
             calib_images, scales, int4_weights, report_path, calib_sigma, sigma, verify, test_data, budget,
             search, **certify_options):
    """Quantize MODEL and lower it to a QDQ ONNX model: at a fixed precision (--bits, --w-bits/--a-bits,
    --policy), or at the precision an ARQ search finds under a BitOps --budget.

    With --sigma, the ONNX model is certified in onnxruntime (ENABLE_ALL) on --test-data and the certificate
    goes into the report; with --verify, per-sample predictions of onnxruntime and the torch simulation on the
    same noise are compared too, and the model is written only if they disagree on at most --max-disagreement
    of the samples. Activation ranges are calibrated on --data images with noise at --calib-sigma, which
    defaults to --sigma: the inputs a smoothed classifier's base model sees.
    """
    from arqc.cmd_certify import certify_onnx, model_identity
    from arqc.data import check_compatible
    from arqc.pipeline import load_data, prepare, quantize, to_onnx
    from runtime.backends import TorchBackend

    if calib_images < 1:
        raise ArqcError(f"--calib-images must be at least 1, got {calib_images}")
    calib_sigma = (sigma or 0.0) if calib_sigma is None else calib_sigma
    if calib_sigma < 0:
        raise ArqcError(f"--calib-sigma must be >= 0, got {calib_sigma}")
    check = verify_args(sigma, verify, test_data, **certify_options)
    if budget is not None:
        from arqc.arq import compile_with_search

        if bits is not None or w_bits is not None or a_bits is not None or policy_path is not None:
            raise ArqcError("--budget searches the precision: drop --bits/--w-bits/--a-bits/--policy")
        compile_with_search(model, output, arch=arch, trust_pickle=trust_pickle,
                            input_shape=parse_shape(input_shape), data=data, calib_images=calib_images,
                            calib_sigma=calib_sigma, scales=scales, report_path=report_path, check=check,
                            budget=budget, options=search)
        return
    if search["resume"] or search["workdir"] or search["html_path"]:
        raise ArqcError("--resume, --workdir and --html belong to a search: add --budget")
    images = load_data(data)
    prep = prepare(model, arch, trust_pickle, parse_shape(input_shape), images)
    if bits is None and w_bits is None and a_bits is None and policy_path is None:
        raise ArqcError("say which precision to compile to: --bits B, --w-bits/--a-bits, or --policy FILE")
    test_images = None
    if check is not None:
        test_images = load_data(check.test_data).subset(num=check.num_images)
        check_compatible(test_images, prep.input_shape, prep.loaded.num_classes)
        if check.test_data == data:
            click.echo("note: --test-data is the calibration data; report certificates on held-out images",
                       err=True)
    policy = resolve_policy(prep.gm, bits, w_bits, a_bits, policy_path, default=32)
    settings = {"source": prep.loaded.source, "arch": prep.loaded.arch, "input_shape": list(prep.input_shape),
                "num_classes": prep.loaded.num_classes, "scales": scales, "calibration_data": data,
                "calibration_images": min(calib_images, len(images)) if images is not None else 0,
                "base_fingerprint": model_identity(prep.gm), "sigma": sigma,
                "command": shlex.join(["arqc", *sys.argv[1:]])}
    sim = quantize(prep, policy, images, calib_images, scales, calib_sigma)
    onnx_bytes = to_onnx(sim, settings, int4_weights).SerializeToString()
    prof = profile(sim)
    click.echo(format_profile(prof))
    certified = {}
    if check is not None:  # certify (and verify) the exact bytes before anything is written
        reference = TorchBackend(sim, batch_size=400) if check.verify else None
        certified = certify_onnx(onnx_bytes, reference, test_images, sigma=check.sigma, n0=check.n0,
                                 n=check.n, alpha=check.alpha, batch=400, seed=check.seed,
                                 max_disagreement=check.max_disagreement)
    atomic_write(output, lambda f: f.write(onnx_bytes))
    click.echo(f"wrote {output}")
    if report_path:
        summary = {}
        if certified:
            cert = certified["certificate"]
            summary = {"certified_accuracy": cert["certified_accuracy"], "acr": cert["acr"]}
        write_json(report_path, {"method": "fixed", "policy": policy_to_json(policy), "settings": settings,
                                 "bitops_ratio_fp32": prof.bitops_ratio_fp32, "profile": prof.to_json(),
                                 **summary, **certified})


# Commands defined in their own modules (one import and one add_command line each).
# -- command registrations: begin --
from arqc.cmd_train import train_cmd  # noqa: E402

cli.add_command(train_cmd)
from arqc.cmd_certify import certify  # noqa: E402

cli.add_command(certify)
# -- command registrations: end --


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="arqc", standalone_mode=False)
    except ArqcError as err:
        click.echo(f"arqc: error: {err}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("arqc: aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        click.echo(f"arqc: error: {err.format_message()}", err=True)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("arqc: interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
