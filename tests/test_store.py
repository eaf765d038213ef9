"""The variant store: atomic writes, idempotence, corruption detection."""

import json
import shutil

import pytest

import variants
from variants import CorruptArtifactError, Store, StoreError, UnknownNameError


def _small(root, **kw):
    return variants.generate("resnet10", root, num_classes=10, resolution=32, **kw)


def test_manifest_records_what_it_promises(tiny_store):
    m = tiny_store.get("resnet10+int8")
    assert m.parent == "resnet10" and m.base == "resnet10"
    assert [s.kind for s in m.specs] == ["quantize"]
    assert set(m.files) == {"model.onnx"}
    assert m.files["model.onnx"].sha256 and m.bytes == m.onnx_path.stat().st_size
    assert m.params == tiny_store.get("resnet10").params > 1_000_000
    assert {"torch", "onnxruntime-gpu"} & set(m.versions)
    base = tiny_store.get("resnet10")
    assert base.export_check["passed"] and base.export_check["max_abs_diff"] < 1e-3
    assert base.weights == "weights.safetensors"
    raw = json.loads((base.path / "manifest.json").read_text())
    for k in ("name", "key", "parent", "specs", "family", "files", "params", "bytes",
              "export_check", "versions", "created"):
        assert k in raw


def test_generate_is_idempotent(tmp_path):
    first = _small(tmp_path, quantize=["int8"])
    assert [r.status for r in first] == ["created", "created"]
    mtime = (tmp_path / "variants" / "resnet10" / "model.onnx").stat().st_mtime_ns
    again = _small(tmp_path, quantize=["int8"])
    assert [r.status for r in again] == ["skipped", "skipped"]
    assert [r.key for r in again] == [r.key for r in first]
    assert (tmp_path / "variants" / "resnet10" / "model.onnx").stat().st_mtime_ns == mtime


def test_resume_after_interrupt_does_only_the_rest(tmp_path, monkeypatch):
    import variants.quantize as q

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(q, "convert_fp16", boom)
    with pytest.raises(KeyboardInterrupt):
        _small(tmp_path, quantize=["int8", "fp16"])
    st = Store(tmp_path)
    assert st.names() == ["resnet10", "resnet10+int8"]  # the interrupted one left nothing
    monkeypatch.undo()
    res = _small(tmp_path, quantize=["int8", "fp16"])
    assert [r.status for r in res] == ["skipped", "skipped", "created"]
    assert st.clean_staging() >= 1  # the interrupted staging folder is swept


def test_corrupt_file_is_detected_and_named(tmp_path):
    _small(tmp_path)
    st = Store(tmp_path)
    onnx = st.get("resnet10").onnx_path
    original = onnx.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    with pytest.raises(CorruptArtifactError, match="model.onnx"):
        st.verify("resnet10")
    with pytest.raises(CorruptArtifactError):
        variants.open_session(st, "resnet10")
    onnx.write_bytes(original)
    st.verify("resnet10")
    (st.get("resnet10").path / "weights.safetensors").unlink()
    with pytest.raises(CorruptArtifactError, match="missing"):
        st.verify("resnet10")


def test_same_name_other_key_is_refused(tmp_path):
    _small(tmp_path)
    with pytest.raises(StoreError, match="another key"):
        _small(tmp_path, seed=1)  # other random weights under the same name
    res = _small(tmp_path, seed=1, name="resnet10-b")  # fine under another name
    assert res[0].status == "created"


def test_store_errors_are_clear(tmp_path):
    with pytest.raises(StoreError, match="not a memadapt store"):
        Store(tmp_path / "nope")
    st = Store(tmp_path, create=True)
    with pytest.raises(UnknownNameError, match="unknown variant"):
        st.get("resnet10")
    d = tmp_path / "variants" / "broken"
    d.mkdir()
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(StoreError, match="not valid JSON"):
        st.get("broken")
    shutil.rmtree(d)


def test_remove_is_atomic(tmp_path):
    _small(tmp_path, quantize=["int8"])
    st = Store(tmp_path)
    st.remove("resnet10+int8")
    assert st.names() == ["resnet10"]
