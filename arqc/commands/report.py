"""``arqc report``: the compile report and certificates of a model arqc compiled, rebuilt from its metadata."""

from __future__ import annotations

import json

import click

from arqc import api
from arqc.base import ArqcError, atomic_write
from arqc.reports import format_compile_report, render_html


@click.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--html", "html_path", type=click.Path(dir_okay=False), help="Also write the HTML page with plots.")
@click.option("--compare", multiple=True, type=click.Path(dir_okay=False),
              help="Report JSON of another run (a baseline) to plot next to this one; repeatable.")
def report(model, html_path, compare):
    """Show the compile report of an ONNX model arqc compiled (a search's report, or a fixed policy) and the
    certificates it carries (L2 randomized smoothing, L-inf interval bounds), from its metadata alone."""
    data = api.report(model)
    click.echo(format_compile_report(data))
    if html_path:
        others = []
        for path in compare:
            try:
                others.append(json.loads(open(path).read()))
            except (OSError, json.JSONDecodeError) as err:
                raise ArqcError(f"cannot read report {path}: {err}; give a report JSON from arqc compile") from None
        atomic_write(html_path, lambda f: f.write(render_html(data, others).encode()))
        click.echo(f"wrote {html_path}")
