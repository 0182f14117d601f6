"""The docs state the contract, so they must hold together: the site builds with no broken link or anchor
(`mkdocs build --strict`), README.md stays a short front page whose relative links all resolve, and its
set-up lines are the ones CI runs (.ci/run)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"

README_MAX_LINES = 200
SETUP_COMMANDS = ['pip install -e . && diffuse train', 'pip install -e ".[test]" && pytest']


def test_mkdocs_build_strict(tmp_path):
    """Every page builds and every link and anchor between pages (and into benchmarks/results/) resolves."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site"),
         "-f", str(ROOT / "mkdocs.yml")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    if "No module named mkdocs" in output:
        raise AssertionError('mkdocs is not installed: pip install -e ".[test]" (or ".[docs]")')
    assert proc.returncode == 0, f"mkdocs build --strict failed (rc {proc.returncode}):\n{output}"
    assert (tmp_path / "site" / "index.html").is_file()


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; at most {README_MAX_LINES}"


def _prose(markdown: str) -> str:
    """Markdown without fenced code blocks and inline code, where `[…](…)` is not a link."""
    markdown = re.sub(r"^(```|~~~).*?^\1[ \t]*$", "", markdown, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", markdown)


def relative_links(markdown: str) -> list[str]:
    """Targets of inline links and images that are not URLs or in-page anchors, without their #fragment."""
    targets = re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", _prose(markdown))
    return [t.split("#", 1)[0] for t in targets
            if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t) and not t.startswith("#")]


def test_relative_links_helper():
    md = ("[a](docs/x.md#y) ![p](img.png) [u](https://e.org) [m](mailto:a@b) [h](#here)\n"
          "`[c](not/a/link.md)`\n```\n[d](in/code.md)\n```\n")
    assert relative_links(md) == ["docs/x.md", "img.png"]


def test_readme_links_point_at_existing_files():
    links = relative_links(README.read_text(encoding="utf-8"))
    assert links, "README.md links nothing"
    missing = [t for t in links if not (ROOT / t).is_file()]
    assert not missing, f"README.md links files that do not exist: {missing}"


def setup_commands() -> list[str]:
    """The commands of README.md's `## Set up` code block, without their comments."""
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^## Set up\s*\n+```[a-z]*\n(.*?)^```", text, flags=re.M | re.S)
    assert match, "README.md has no `## Set up` section with a code block"
    return [line.split("  #", 1)[0].strip() for line in match.group(1).splitlines() if line.strip()]


def test_readme_setup_lines():
    """The two set-up lines are the project's promise to a new user: install + train, install + test."""
    assert setup_commands() == SETUP_COMMANDS


def test_ci_runs_the_readme_setup_line():
    """.ci/run runs README's test set-up line verbatim, and installs nothing the README does not say."""
    ci_lines = [line.strip() for line in CI.read_text(encoding="utf-8").splitlines()]
    readme = setup_commands()
    tests_line = [c for c in readme if "pytest" in c]
    assert tests_line, "README.md's set-up has no test line"
    for command in tests_line:
        assert command in ci_lines, f".ci/run does not run README.md's set-up line verbatim: {command!r}"
    for line in ci_lines:
        if line.startswith("pip install"):
            assert line in readme, f".ci/run runs {line!r}, which README.md's set-up does not show"
