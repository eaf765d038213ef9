"""The foundation issue's acceptance checks on full-size models (tens of seconds)."""

import json

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from cli import main


def _generate_and_list(tmp_path, *args):
    runner = CliRunner()
    r = runner.invoke(main, ["generate", *args, "--out", str(tmp_path)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["list", str(tmp_path), "--json"], catch_exceptions=False)
    return {x["name"]: x for x in json.loads(r.output)}


def test_resnet18_int8(tmp_path):
    rows = _generate_and_list(tmp_path, "resnet18", "--quantize", "int8")
    assert set(rows) == {"resnet18", "resnet18+int8"}
    assert rows["resnet18+int8"]["bytes"] <= 0.30 * rows["resnet18"]["bytes"]
    for row in rows.values():
        s = ort.InferenceSession(row["onnx_path"], providers=["CPUExecutionProvider"])
        for b in (1, 4):
            x = np.random.default_rng(b).standard_normal((b, 3, 224, 224)).astype(np.float32)
            assert s.run(None, {"input": x})[0].shape == (b, 1000)


@pytest.mark.parametrize("model,hidden", [("minilm", 384), ("bert-mini", 256)])
def test_bert_int8(tmp_path, model, hidden):
    rows = _generate_and_list(tmp_path, model, "--quantize", "int8")
    assert set(rows) == {model, f"{model}+int8"}
    assert rows[f"{model}+int8"]["bytes"] <= 0.30 * rows[model]["bytes"]
    for row in rows.values():
        s = ort.InferenceSession(row["onnx_path"], providers=["CPUExecutionProvider"])
        for b, t in ((1, 7), (4, 19)):
            ids = np.random.default_rng(b).integers(1000, 30000, (b, t)).astype(np.int64)
            out = s.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
            assert out.shape == (b, t, hidden)
    # real MiniLM weights: int8 stays close to fp32 (cosine on calibration text)
    if model == "minilm":
        assert rows["minilm+int8"]["metrics"]["cosine_to_parent"] > 0.95
