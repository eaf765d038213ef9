"""The examples run end to end in their --smoke size (real models, real profiling)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script", ["resnet_family.py", "bert_family.py"])
def test_example_smoke(script, tmp_path):
    store = tmp_path / "store"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--smoke",
                           "--store", str(store)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "plans" in proc.stdout and "catalog" in proc.stdout
    assert (store / "pareto.png").stat().st_size > 10_000
    assert (store / "catalog.sqlite").exists()
