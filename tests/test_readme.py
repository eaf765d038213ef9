"""The README's generated figures are what the committed results say."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import readme  # noqa: E402


def test_readme_blocks_match_the_committed_results():
    text = (ROOT / "README.md").read_text()
    assert "<!-- BEGIN headline -->" in text
    assert readme.render(text) == text, "README is stale: run python benchmarks/readme.py"


def test_changing_a_result_changes_the_readme(tmp_path):
    res = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", res)
    doc = json.loads((res / "policies.json").read_text())
    doc["summary"]["late"] -= 1
    (res / "policies.json").write_text(json.dumps(doc))
    text = (ROOT / "README.md").read_text()
    assert readme.render(text, res) != text
