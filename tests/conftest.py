"""Shared fixtures."""

import sys

import pytest


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run the `meshplan` console entry point in-process: returns (exit code, stdout, stderr)."""
    from planner.cli import main

    def run(args):
        monkeypatch.setattr(sys, "argv", ["meshplan", *args])
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
