"""The CLI: real commands through click's runner, error paths and exit codes."""

import json

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from cli import main


@pytest.fixture()
def run():
    runner = CliRunner()

    def _run(*args):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return _run


def test_help_teaches(run):
    r = run("--help")
    assert r.exit_code == 0 and "generate" in r.output and "Typical flow" in r.output
    r = run("generate", "--help")
    assert "--combine" in r.output and "Examples" in r.output


def test_models_lists_families(run):
    r = run("models", "--json")
    names = {m["name"]: m for m in json.loads(r.output)}
    assert {"resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "minilm",
            "bert-base"} <= set(names)
    assert names["minilm"]["family"] == "bert"
    assert "resnet18" in run("models").output


def test_generate_then_list_json(run, tmp_path):
    store = tmp_path / "s"
    r = run("generate", "resnet10", "--num-classes", "10", "--resolution", "32",
            "--quantize", "int8", "--out", store)
    assert r.exit_code == 0, r.output
    assert "resnet10+int8" in r.output and "created" in r.output
    r = run("list", store, "--json")
    rows = json.loads(r.output)
    assert [x["name"] for x in rows] == ["resnet10", "resnet10+int8"]
    for x in rows:
        assert {"name", "key", "specs", "params", "bytes", "onnx_path"} <= set(x)
        s = ort.InferenceSession(x["onnx_path"], providers=["CPUExecutionProvider"])
        out = s.run(None, {"input": np.zeros((4, 3, 32, 32), np.float32)})[0]
        assert out.shape == (4, 10)
    assert rows[1]["specs"] == [{"kind": "quantize", "mode": "int8", "version": 1}]
    r = run("generate", "resnet10", "--num-classes", "10", "--resolution", "32",
            "--quantize", "int8", "--out", store, "--json")
    assert [x["status"] for x in json.loads(r.output)] == ["skipped", "skipped"]
    assert run("list", store, "--verify").exit_code == 0


@pytest.mark.parametrize("args,needle", [
    (("generate", "resnet1000", "--out", "S"), "known: "),
    (("generate", "resnet10", "--prune", "1.5", "--out", "S"), "(0, 1)"),
    (("generate", "resnet10", "--prune", "abc", "--out", "S"), "(0, 1)"),
    (("generate", "resnet10", "--quantize", "int4", "--out", "S"), "int8, fp16"),
    (("generate", "resnet10", "--exit", "0", "--out", "S"), ">= 1"),
    (("generate", "resnet10", "--exit", "9", "--out", "S"), "1..3"),
    (("generate", "bert-tiny", "--resolution", "64", "--out", "S"), "ResNets only"),
    (("generate", "resnet10", "--calib", "nosuch.npz", "--quantize", "int8", "--out", "S"),
     "neither a built-in name"),
    (("generate", "resnet10"), "--out"),
])
def test_bad_input_exits_2_with_what_is_allowed(run, tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    r = run(*args)
    assert r.exit_code == 2, r.output
    assert needle in r.output
    assert "Traceback" not in r.output


def test_runtime_failure_exits_1_in_one_line(run, tmp_path):
    r = run("list", tmp_path / "missing")
    assert r.exit_code == 1
    assert "not a memadapt store" in r.output and "Traceback" not in r.output


def test_corrupt_store_is_reported(run, tmp_path):
    store = tmp_path / "s"
    assert run("generate", "resnet10", "--num-classes", "10", "--resolution", "32",
               "--out", store).exit_code == 0
    onnx = store / "variants" / "resnet10" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-10])
    r = run("list", store, "--verify")
    assert r.exit_code == 1 and "model.onnx" in r.output
