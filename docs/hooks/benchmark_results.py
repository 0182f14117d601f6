"""MkDocs hook: serve benchmarks/results/ (the one copy of every measurement) as part of the site.

The docs link to result files as they lie in the repository, e.g. `../benchmarks/results/train_step.md` from
docs/benchmarks.md, so the links also work when the Markdown is read on disk or on a forge. MkDocs sees only
docs_dir, so this hook adds every file of benchmarks/results/ to the site under `benchmarks/results/` and
rewrites those links to point there; `mkdocs build --strict` then checks them like any other link.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

RESULTS = "benchmarks/results"


def on_files(files, config):
    root = Path(config["config_file_path"]).resolve().parent
    for path in sorted((root / RESULTS).iterdir()):
        if path.is_file() and not path.name.startswith("."):
            files.append(File(f"{RESULTS}/{path.name}", str(root), config["site_dir"],
                              config["use_directory_urls"]))
    return files


def on_page_markdown(markdown, page, config, files):
    depth = page.file.src_uri.count("/")
    if page.file.src_uri.startswith(RESULTS + "/"):
        return markdown
    # on disk: one more `../` (out of docs/) than in the site, where the results sit beside the pages
    return re.sub(r"\]\(" + re.escape("../" * (depth + 1) + RESULTS + "/"),
                  "](" + "../" * depth + RESULTS + "/", markdown)
