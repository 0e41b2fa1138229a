"""The ``arqc`` command line. Every user error is one line on stderr and exit status 2."""

from __future__ import annotations

import json
import shlex
import sys

import click

from arqc import __version__
from arqc.errors import ArqcError
from arqc.loading import atomic_write
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


def write_json(path: str, data: dict) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()))


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
    w = check_bits(bits if bits is not None else (w_bits if w_bits is not None else default), "--w-bits")
    a = check_bits(bits if bits is not None else (a_bits if a_bits is not None else default), "--a-bits")
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


@cli.command(name="compile")
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The ONNX file to write.")
@model_options
@bits_options
@click.option("--data", help="Calibration images (clean training split), e.g. cifar10:DIR:train.")
@click.option("--calib-images", default=512, show_default=True, help="Images used for activation ranges.")
@click.option("--scales", type=click.Choice(SCALES), default="float", show_default=True,
              help="float: DESIGN's max scaling; po2: power-of-two scales, bit-exact across backends.")
@click.option("--int4-weights", is_flag=True, help="Store <=4-bit weights in native INT4 containers.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), help="Write the compile report JSON.")
def compile_(model, output, arch, trust_pickle, input_shape, bits, w_bits, a_bits, policy_path, data,
             calib_images, scales, int4_weights, report_path):
    """Quantize MODEL at a fixed precision policy and lower it to a QDQ ONNX model."""
    from arqc.pipeline import load_data, prepare, quantize, to_onnx

    if calib_images < 1:
        raise ArqcError(f"--calib-images must be at least 1, got {calib_images}")
    images = load_data(data)
    prep = prepare(model, arch, trust_pickle, parse_shape(input_shape), images)
    if bits is None and w_bits is None and a_bits is None and policy_path is None:
        raise ArqcError("say which precision to compile to: --bits B, --w-bits/--a-bits, or --policy FILE")
    policy = resolve_policy(prep.gm, bits, w_bits, a_bits, policy_path, default=32)
    sim = quantize(prep, policy, images, calib_images, scales)
    settings = {"source": prep.loaded.source, "arch": prep.loaded.arch, "input_shape": list(prep.input_shape),
                "num_classes": prep.loaded.num_classes, "scales": scales, "calibration_data": data,
                "calibration_images": min(calib_images, len(images)) if images is not None else 0,
                "command": shlex.join(["arqc", *sys.argv[1:]])}
    onnx_model = to_onnx(sim, settings, int4_weights)
    prof = profile(sim)
    click.echo(format_profile(prof))
    atomic_write(output, lambda f: f.write(onnx_model.SerializeToString()))
    click.echo(f"wrote {output}")
    if report_path:
        write_json(report_path, {"policy": policy_to_json(policy), "bitops_ratio_fp32": prof.bitops_ratio_fp32,
                                 "profile": prof.to_json(), "settings": settings})


# Commands defined in their own modules (one import and one add_command line each).
# -- command registrations: begin --
from arqc.cmd_train import train_cmd  # noqa: E402

cli.add_command(train_cmd)
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
