"""Shared helpers for tests that drive the ``arqc`` command line in-process: run it and check that a bad input
ended in exactly one ``arqc: error: ...`` line with exit status 2.

Imported by its bare name (``from cli_helpers import run_cli``): tests/ has no __init__.py, and pytest's default
"prepend" import mode puts tests/ on sys.path, under both ``pytest`` and ``python -m pytest``."""

from __future__ import annotations

from arqc.cli import main


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run ``arqc ARGV`` in-process: (exit status, stdout, stderr); a normal return counts as status 0."""
    try:
        main(argv)
        code = 0
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code: int, err: str, *fragments: str) -> None:
    """Exit status 2 and stderr is one ``arqc: error: `` line containing every fragment."""
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("arqc: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
