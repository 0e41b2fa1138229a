"""Options and parsers that more than one ``arqc`` command shares; each is declared here once."""

from __future__ import annotations

import click

from arqc.base import ArqcError
from arqc.settings import DEFAULT_ALPHA, DEFAULT_N0, CertifySettings


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """``--input-shape``: "3,32,32" (or 3x32x32) → (3, 32, 32)."""
    if text is None:
        return None
    try:
        shape = tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise ArqcError(f"--input-shape {text!r} is not C,H,W (e.g. 3,32,32)") from None
    if len(shape) != 3 or min(shape) < 1:
        raise ArqcError(f"--input-shape {text!r} is not C,H,W with positive sizes (e.g. 3,32,32)")
    return shape


def parse_epsilon(text: str) -> float:
    """"2/255" or "0.0078" → float."""
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise ArqcError(f"--epsilon {text!r} is not a number; give e.g. 2/255 or 0.0078") from None


def _apply(f, decorators):
    for decorator in reversed(decorators):
        f = decorator(f)
    return f


def model_options(f):
    """--arch, --trust-pickle, --input-shape: how to load a model file."""
    return _apply(f, [
        click.option("--arch", help="Architecture for state_dict files: a built-in name or package.module:factory."),
        click.option("--trust-pickle", is_flag=True, help="Allow a fully pickled nn.Module (runs code from the file)."),
        click.option("--input-shape", help="C,H,W when the arch does not say (e.g. 3,32,32)."),
    ])


def bits_options(what: str = ""):
    """A decorator adding --bits, --w-bits, --a-bits, --policy: the precision (``what`` prefixes the help)."""
    return lambda f: _apply(f, [
        click.option("--bits", type=int, help=f"{what}Uniform weight and activation bits (2..8, 32 = float)."),
        click.option("--w-bits", type=int, help=f"{what}Uniform weight bits (2..8, 32 = float)."),
        click.option("--a-bits", type=int, help=f"{what}Uniform activation bits (2..8, 32 = float)."),
        click.option("--policy", "policy_path", type=click.Path(dir_okay=False),
                     help=f"{what}JSON file: layer -> {{w_bits, a_bits}}."),
    ])


def ray_options(f):
    """--ray, --ray-workers, --chunk: run the randomized-smoothing work on a Ray cluster (extra arqc[ray])."""
    return _apply(f, [
        click.option("--ray", "ray_address", is_flag=False, flag_value="auto", default=None, metavar="[ADDRESS]",
                     help="Run the certification work on a Ray cluster (extra arqc[ray]): auto (the cluster this "
                     "machine joined with `ray start`; the default of a bare --ray), local (start Ray here) or "
                     "HOST:PORT. Same results as a local run."),
        click.option("--ray-workers", type=int, help="Ray worker actors, one CPU each [default: the cluster's CPUs]."),
        click.option("--chunk", type=int, help="Images per Ray task [default: about 20,000 forward passes, and "
                     "at least 4 tasks per worker]."),
    ])


COMPILE_CERTIFY = CertifySettings(sigma=1.0)  # the defaults of compile's certification options


def certify_settings_options(f):
    """The ``arqc compile`` options that certify (and verify) the lowered model: collected by
    :func:`certify_settings`."""
    d = COMPILE_CERTIFY
    return _apply(f, [
        click.option("--sigma", type=float, help="Certify the ONNX model in --runtime at noise level σ."),
        click.option("--runtime", type=click.Choice(["onnxruntime", "openvino"]),
                     help="Where --sigma certifies the model: the runtime it is deployed to [default: onnxruntime]; "
                     "openvino needs the extra arqc[openvino]."),
        click.option("--compare-runtime", type=click.Choice(["onnxruntime", "openvino"]),
                     help="Also run the model in this other runtime on the same noisy samples and report (and "
                     "check against --max-disagreement) how often the two disagree."),
        click.option("--verify", is_flag=True, help="Also compare the ONNX model with the torch simulation "
                     "on the same noisy samples; refuse (write nothing) above --max-disagreement."),
        click.option("--test-data", help="Held-out test images for --sigma (never the calibration images) "
                     "[default: the test images an arqc checkpoint records]."),
        click.option("--num-images", type=int, help=f"Test images to certify [default: {d.num_images}]."),
        click.option("--n", "n", type=int, help=f"Estimation samples per image [default: {d.n}]."),
        click.option("--n0", type=int, help=f"Selection samples per image [default: {DEFAULT_N0}]."),
        click.option("--alpha", type=float, help=f"Failure probability [default: {DEFAULT_ALPHA}]."),
        click.option("--max-disagreement", type=float,
                     help="Largest allowed rate at which the certified runtime disagrees with the torch simulation "
                     f"(--verify) or --compare-runtime [default: {d.max_disagreement}]."),
        click.option("--seed", type=int, help=f"Noise seed of the certification [default: {d.seed}]."),
    ])


def certify_settings(sigma: float | None, verify: bool, test_data: str | None, epsilon: str | None = None,
                     **given) -> CertifySettings | None:
    """Checked settings of ``compile --sigma`` (None without --sigma); ``given``: the other options above
    (None when unset). ``--test-data`` alone is allowed with ``--epsilon`` (the L∞ certificate's images); with
    --sigma it may be left out for the test images an arqc checkpoint records (arqc.api.recorded_images)."""
    if sigma is None:
        named = (("verify", verify or None), ("test_data", None if epsilon else test_data), *given.items())
        extra = [name for name, value in named if value is not None]
        if extra:
            raise ArqcError(f"--{extra[0].replace('_', '-')} needs --sigma (the noise level to certify at)")
        return None
    return CertifySettings(sigma=sigma, verify=verify, **{k: v for k, v in given.items() if v is not None})
