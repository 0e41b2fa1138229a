"""``arqc certify``: randomized-smoothing L2 certificates (``--method rs``, arqc/certify_l2.py: models, backends,
resuming, IRS) or deterministic L∞ certificates of the quantized network (``--method ibp``, arqc/certify_linf.py:
interval bounds, optionally completed by the verifier)."""

from __future__ import annotations

from pathlib import Path

import click

from arqc import api
from arqc.base import ArqcError, write_json
from arqc.certify_l2 import path_lines
from arqc.certify_linf import certify_ibp, format_linf_report, quantized_model
from arqc.commands.options import bits_options, model_options, parse_epsilon, parse_shape, ray_options
from arqc.data import check_compatible, load_images
from arqc.runtime.backends import OPT_LEVELS
from arqc.runtime.run import format_table
from arqc.settings import DEFAULT_ALPHA, DEFAULT_N, DEFAULT_N0


def state_path_for(json_path: str | None, state: str | None) -> Path | None:
    """The state file of a run: the one named with --state, else JSON.state beside --json (else none)."""
    if state is not None:
        return Path(state)
    return None if json_path is None else Path(json_path + ".state")


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True, help="Labelled test images the model never saw, e.g. cifar10:DIR:test "
              "or npz:FILE (see arqc.data).")
@click.option("--method", type=click.Choice(["rs", "ibp"]), default="rs", show_default=True,
              help="rs: randomized smoothing (L2, statistical); ibp: interval bounds (L∞, deterministic).")
@click.option("--sigma", type=float, help="Noise std σ in [0, 1] pixel units (--method rs).")
@click.option("--n", "n", type=int, help=f"Estimation samples per image [default: {DEFAULT_N}; with "
              "--irs-cache: the cache's n].")
@click.option("--n0", type=int, help=f"Selection samples per image [default: {DEFAULT_N0}; with --irs-cache: "
              "the cache's, unused].")
@click.option("--alpha", type=float, help=f"Failure probability α [default: {DEFAULT_ALPHA}; with "
              "--irs-cache: the cache's].")
@click.option("--num-images", type=int, help="Certify at most this many images [default: all].")
@click.option("--skip", type=int, default=1, show_default=True, help="Certify every K-th image.")
@click.option("--batch", type=int, default=400, show_default=True, help="Noisy samples per forward pass.")
@click.option("--seed", type=int, help="Run seed: a point's noise depends on it and the image id only "
              "[default: 0; with --irs-cache: the cache's, unused].")
@click.option("--backend", type=click.Choice(["torch", "ort", "openvino"]),
              help="torch (default for checkpoints), ort (onnxruntime, default for .onnx) or openvino (OpenVINO's "
              "CPU plugin, extra arqc[openvino]); checkpoints are lowered at FP32 for ort and openvino.")
@click.option("--ort-opt", type=click.Choice(list(OPT_LEVELS)), default="all", show_default=True,
              help="onnxruntime graph optimization level.")
@click.option("--threads", type=int,
              help="CPU threads (torch, onnxruntime's intra-op pool, or OpenVINO's inference threads).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the results as JSON.")
@click.option("--state", "state", type=click.Path(dir_okay=False),
              help="State file for resuming [default: JSON.state beside --json, removed once the JSON is "
              "written]. A named one is kept: a later run with a larger --num-images extends it.")
@click.option("--irs-cache", type=click.Path(dir_okay=False),
              help="Certify MODEL incrementally against this cache of its full-precision model.")
@click.option("--save-irs-cache", type=click.Path(dir_okay=False),
              help="Also write an IRS cache of MODEL (certify the full-precision model with it).")
@model_options
@click.option("--epsilon", help="L∞ radius for --method ibp, in [0, 1] pixel units (e.g. 2/255).")
@click.option("--complete", is_flag=True, help="--method ibp: split boxes until verified or falsified.")
@click.option("--timeout", type=float, default=10.0, show_default=True,
              help="--method ibp --complete: seconds per input.")
@bits_options("--method ibp on a checkpoint: ")
@click.option("--calib-data", help="--method ibp on a checkpoint: calibration images (training split).")
@ray_options
def certify(model, data, method, sigma, n, n0, alpha, num_images, skip, batch, seed, backend, ort_opt, threads,
            json_path, state, irs_cache, save_irs_cache, arch, trust_pickle, input_shape, epsilon, complete, timeout,
            bits, w_bits, a_bits, policy_path, calib_data, ray_address, ray_workers, chunk):
    """Certify the smoothed MODEL (Cohen et al.'s CERTIFY) on --data at noise level --sigma, or (--method ibp)
    the quantized MODEL itself with interval bounds at L∞ radius --epsilon.

    Prints a progress bar and a table of certified accuracy per radius, ACR, clean smoothed accuracy and
    abstain rate, with n, n0, alpha, sigma and the number of images. A rerun of an interrupted command with
    --json (or --state) continues where it stopped.
    """
    if method == "ibp":
        if sigma is not None or irs_cache or save_irs_cache or ray_address:
            raise ArqcError("--sigma, IRS caches and --ray belong to --method rs; --method ibp takes --epsilon")
        if epsilon is None:
            raise ArqcError("--method ibp needs --epsilon (the L∞ radius, e.g. 2/255)")
        eps = parse_epsilon(epsilon)
        images = load_images(data).subset(num=num_images, skip=skip)
        sim, shape, classes, onnx_model = quantized_model(
            model, arch=arch, trust_pickle=trust_pickle, input_shape=parse_shape(input_shape), bits=bits,
            w_bits=w_bits, a_bits=a_bits, policy=policy_path, calib_data=calib_data)
        check_compatible(images, shape, classes)
        report = certify_ibp(sim, images, eps, complete=complete, timeout=timeout, onnx_model=onnx_model)
        report.update({"model": model, "data": data, "skip": skip})
        click.echo(format_linf_report(report))
        if json_path:
            write_json(json_path, report)
            click.echo(f"wrote {json_path}")
        return
    if sigma is None:
        raise ArqcError("--method rs needs --sigma (the noise level of the smoothed classifier)")
    if epsilon or complete or bits or w_bits or a_bits or policy_path or calib_data:
        raise ArqcError("--epsilon, --complete, --bits/--policy and --calib-data belong to --method ibp")
    state_path = state_path_for(json_path, state) if state or not save_irs_cache else None
    result = api.certify(model, data, sigma=sigma, n=n, n0=n0, alpha=alpha, seed=seed, num_images=num_images,
                         skip=skip, batch=batch, backend=backend, arch=arch, trust_pickle=trust_pickle,
                         input_shape=parse_shape(input_shape), ort_opt=ort_opt, threads=threads,
                         state_path=state_path, irs_cache=irs_cache, save_irs_cache=save_irs_cache, progress=True,
                         log=click.echo, ray=ray_address, ray_workers=ray_workers, chunk=chunk)
    result.model, result.data, result.skip = model, data, skip
    click.echo(format_table(result))
    if irs_cache:
        click.echo("\n".join(path_lines(result)))
    if json_path:
        write_json(json_path, result.to_json())
        click.echo(f"wrote {json_path}")
    if state_path is not None and json_path and state is None:  # a --state the user named is kept
        state_path.unlink(missing_ok=True)
