"""The README's generated figures are what the committed results say."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import readme  # noqa: E402


def test_readme_blocks_match_the_committed_results():
    text = (ROOT / "README.md").read_text()
    assert "<!-- BEGIN headline -->" in text and "<!-- BEGIN measured -->" in text
    assert readme.render(text) == text, "README is stale: run python benchmarks/readme.py"


@pytest.mark.parametrize("name,change", [
    ("policies.json", lambda d: d["summary"].__setitem__("late", d["summary"]["late"] - 1)),
    ("profile.json", lambda d: d.__setitem__("profile_s", d["profile_s"] + 60)),
    ("recovery.json", lambda d: d["minilm"]["variants"][0].__setitem__("fidelity_after", 0.5)),
    ("loadtest.json", lambda d: d.__setitem__("failed", d["failed"] + 1)),
])
def test_changing_a_result_changes_the_readme(tmp_path, name, change):
    res = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", res)
    doc = json.loads((res / name).read_text())
    change(doc)
    (res / name).write_text(json.dumps(doc))
    text = (ROOT / "README.md").read_text()
    assert readme.render(text, res) != text
