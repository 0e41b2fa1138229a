"""``arqc train --method qa-ibp``: QA-IBP training of a quantized network (arqc/qaibp.py), written as the
QDQ ONNX model it trains (weights and scales as trained; ``arqc certify --method ibp`` reads it back)."""

from __future__ import annotations

import shlex
import sys

import click

from arqc.errors import ArqcError


def train_qaibp_cli(*, arch, data, epsilon, bits, w_bits, a_bits, policy_path, kappa_end, epochs, output, init,
                    lr, batch_size, seed, device) -> None:
    from arqc.cli import resolve_policy
    from arqc.cmd_ibp import parse_epsilon
    from arqc.data import load_images
    from arqc.loading import atomic_write
    from arqc.pipeline import prepare, to_onnx
    from arqc.qaibp import train_qaibp

    if epsilon is None:
        raise ArqcError("--method qa-ibp needs --epsilon (the L-inf radius to train for, e.g. 0.1)")
    if not output.endswith(".onnx"):
        raise ArqcError(f"--method qa-ibp writes the trained quantized network as ONNX: give -o {output}.onnx")
    if bits is None and w_bits is None and a_bits is None and policy_path is None:
        raise ArqcError("--method qa-ibp trains a quantized network: give --bits B, --w-bits/--a-bits or --policy")
    eps = parse_epsilon(epsilon)
    images = load_images(data)
    prep = prepare(init, arch, images=images)
    policy = resolve_policy(prep.gm, bits, w_bits, a_bits, policy_path, default=32)
    click.echo(f"QA-IBP training of {arch} on {len(images)} images of {data}: epsilon={eps:g}, {epochs} epochs")
    sim, history = train_qaibp(prep.gm, images, eps, epochs, policy, kappa_end=kappa_end, lr=lr,
                               batch_size=batch_size, seed=seed, device=device,
                               log=lambda r: click.echo(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else
                                                                 f"{k}={v}" for k, v in r.items())))
    settings = {"source": init, "arch": arch, "input_shape": list(prep.input_shape),
                "num_classes": prep.loaded.num_classes, "scales": "float", "calibration_data": data,
                "training": {"method": "qa-ibp", "epsilon": eps, "epochs": epochs, "kappa_end": kappa_end,
                             "lr": lr, "seed": seed, "history": history},
                "command": shlex.join(["arqc", *sys.argv[1:]])}
    model = to_onnx(sim.cpu(), settings)
    atomic_write(output, lambda f: f.write(model.SerializeToString()))
    click.echo(f"wrote {output}")
