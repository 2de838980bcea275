"""Shared fixtures of the reliability tests: the command line run in this process."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys

import pytest

from onnxforge import cli

COMMAND = [sys.executable, "-m", "onnxforge"]


@dataclasses.dataclass
class CliResult:
    """Exit code and output of one command line run."""

    code: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        """The non-empty lines written to stderr."""
        return [line for line in self.stderr.splitlines() if line.strip()]


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """``run_cli(*args, cwd=folder)``: ``onnxforge.cli.main`` as the console script calls it."""

    def run(*args: object, cwd: pathlib.Path) -> CliResult:
        monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", ["onnxforge", *map(str, args)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exited:
            cli.main()
        captured = capsys.readouterr()
        code = exited.value.code
        return CliResult(0 if code is None else int(code), captured.out, captured.err)

    return run


def run_cli_process(
    *args: object, cwd: pathlib.Path, env: dict[str, str] | None = None, timeout: float = 300
) -> CliResult:
    """The command line in a new process, as a user runs it."""
    result = subprocess.run(
        [*COMMAND, *map(str, args)],
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return CliResult(result.returncode, result.stdout, result.stderr)
