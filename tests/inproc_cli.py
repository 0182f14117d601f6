"""The real command line (diffuse.cli.main → Hydra → the job, errors printed as the user sees them) run in
this process: a subprocess spends ~6 s importing torch before it does anything."""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from diffuse.cli import main


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run_inproc(args: list[str], cwd: Path) -> Result:
    """`diffuse ARGS` in `cwd`, in this process: exit code, stdout, stderr."""
    out, err, old_cwd, old_argv = io.StringIO(), io.StringIO(), os.getcwd(), sys.argv
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    saved_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    code = 0
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        os.chdir(old_cwd)
        sys.argv = old_argv
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return Result(code, out.getvalue(), err.getvalue())


def one_error_line(result: Result, job: str) -> str:
    """The single `diffuse JOB: error: …` line of a failed run (asserting there is no traceback)."""
    assert result.returncode != 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    # a progress bar's last frame ends with no newline: the error line may follow it on the same line
    lines = re.findall(rf"diffuse {re.escape(job)}: error: [^\r\n]*", result.stderr)
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]
