"""A plain `pip install .` (a wheel) must carry every config file, so the CLI works from any directory."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # pip builds the wheel


def test_wheel_contains_every_config(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                           str(REPO), "-w", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("diffuse-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {p.relative_to(REPO).as_posix() for p in (REPO / "diffuse" / "conf").rglob("*.yaml")}
    assert configs and configs <= names, sorted(configs - names)
    assert "diffuse/cli.py" in names
