"""``arqc analyze``: where the BitOps go."""

from __future__ import annotations

import click

from arqc import api
from arqc.base import write_json
from arqc.commands.options import bits_options, model_options, parse_shape
from arqc.passes.analysis import format_profile


@click.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@model_options
@bits_options()
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the profile as JSON.")
def analyze(model, arch, trust_pickle, input_shape, bits, w_bits, a_bits, policy_path, json_path):
    """Per-layer shapes, MACs, params and BitOps of MODEL (or of --arch with fresh weights)."""
    prof = api.analyze(model, arch=arch, input_shape=parse_shape(input_shape), bits=bits, w_bits=w_bits,
                       a_bits=a_bits, policy=policy_path, trust_pickle=trust_pickle)
    click.echo(format_profile(prof))
    if json_path:
        write_json(json_path, prof.to_json())
