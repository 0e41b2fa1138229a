"""The ``arqc`` command group: it assembles the commands (arqc/commands/) and turns every user error into one
line on stderr and exit status 2."""

from __future__ import annotations

import sys

import click

from arqc.base import ArqcError, __version__
from arqc.commands.analyze import analyze
from arqc.commands.certify import certify
from arqc.commands.compile import compile_
from arqc.commands.report import report
from arqc.commands.train import train_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="arqc")
def cli():
    """arqc: certifiably robust mixed-precision quantization, lowered to QDQ ONNX."""


for command in (analyze, compile_, certify, train_cmd, report):
    cli.add_command(command)


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
