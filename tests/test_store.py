"""The variant store: atomic writes, idempotence, corruption detection, replacement in one
atomic step, the sweep of staging folders, and the writers' lock (threads and processes)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import variants
import variants.store as store_mod
from variants import CorruptArtifactError, Store, StoreError, UnknownNameError
from variants.store import StoreLockedError


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
    assert list((tmp_path / ".tmp").iterdir()) == []  # nor any staging folder
    res = _small(tmp_path, quantize=["int8", "fp16"])
    assert [r.status for r in res] == ["skipped", "skipped", "created"]


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


# -- store mechanics on hand-made variants (real folders and files, no model needed) ------

def fake_manifest(name, key):
    return {"name": name, "key": key, "base": name, "parent": None, "specs": [],
            "family": "resnet", "model": name, "task": "classification", "arch": {},
            "inputs": [], "outputs": ["logits"], "params": 1, "onnx": "model.onnx",
            "weights": None, "export_check": None}


def stage(st, name, key, payload):
    """A staged variant of one file (what commit needs), and its manifest."""
    s = st.staging(name)
    (s / "model.onnx").write_bytes(payload)
    return s, fake_manifest(name, key)


def _child(code: str, *args: str, **kw) -> subprocess.Popen:
    """A Python process running ``code`` (``stage`` at hand) on the given arguments."""
    head = f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n" \
           "from test_store import stage\n"
    return subprocess.Popen([sys.executable, "-c", head + code, *args], text=True, **kw)


def test_replacing_a_variant_is_one_atomic_step(tmp_path):
    st = Store(tmp_path, create=True)
    st.commit(*stage(st, "v", "k", b"0" * 4096))
    stop, misses, reads = threading.Event(), [], [0]

    def reader():
        while not stop.is_set():
            try:
                m = st.get("v")
                assert (m.path / "model.onnx").read_bytes()[:1].isdigit()
                reads[0] += 1
            except (UnknownNameError, FileNotFoundError) as e:
                misses.append(repr(e))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(1, 60):
            st.commit(*stage(st, "v", "k", str(i % 10).encode() * 4096))
            time.sleep(0.001)
    finally:
        stop.set()
        t.join()
    assert misses == [] and reads[0] > 0
    assert st.get("v").onnx_path.read_bytes() == b"9" * 4096
    st.verify("v")
    assert list((tmp_path / ".tmp").iterdir()) == []  # the old folders are gone


def test_replacement_without_exchange_is_restored_after_a_crash(tmp_path):
    """Where the file system cannot exchange, the old folder is renamed away first; a
    process killed right then leaves no variant in place, and the sweep puts it back."""
    st = Store(tmp_path, create=True)
    st.commit(*stage(st, "v", "k", b"old"))
    crash = _child("""
import os, sys
import variants.store as vs
vs._exchange = lambda a, b: False  # as on a file system without renameat2
real = os.replace
def replace(src, dst):
    real(src, dst)
    if ".replaced-" in str(dst):
        os._exit(9)  # killed between the two renames
os.replace = replace
st = vs.Store(sys.argv[1])
st.commit(*stage(st, "v", "k", b"new"))
""", str(tmp_path))
    assert crash.wait(timeout=60) == 9
    assert st.names() == []  # the worst moment: neither old nor new in place
    assert st.clean_staging() == 2  # the trash (restored from) and the new staging folder
    assert st.names() == ["v"] and st.verify("v").onnx_path.read_bytes() == b"old"
    assert list((tmp_path / ".tmp").iterdir()) == []
    # and without a crash the two-rename path replaces cleanly
    store_exchange = store_mod._exchange
    try:
        store_mod._exchange = lambda a, b: False
        st.commit(*stage(st, "v", "k", b"newer"))
    finally:
        store_mod._exchange = store_exchange
    assert st.verify("v").onnx_path.read_bytes() == b"newer"
    assert list((tmp_path / ".tmp").iterdir()) == []


def test_leftovers_are_tolerated(tmp_path):
    st = Store(tmp_path, create=True)
    st.commit(*stage(st, "v", "k", b"x"))
    (tmp_path / "variants" / "half").mkdir()  # a folder without a manifest is no variant
    (tmp_path / "variants" / "half" / "model.onnx").write_bytes(b"partial")
    (tmp_path / ".tmp" / "w.abc").mkdir()  # a dead run's staging folder
    assert st.names() == ["v"] and "half" not in st
    st.verify("v")
    with pytest.raises(UnknownNameError):
        st.get("half")
    m = st.commit(*stage(st, "half", "k2", b"whole"))  # replaces the leftover folder
    assert m.onnx_path.read_bytes() == b"whole" and st.names() == ["half", "v"]


def test_clean_staging_spares_folders_of_live_writers(tmp_path):
    st = Store(tmp_path, create=True)
    mine = st.staging("a")
    other = _child("""
import sys
from variants.store import Store
print(Store(sys.argv[1]).staging("b"), flush=True)
sys.stdin.read()
""", str(tmp_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        theirs = Path(other.stdout.readline().strip())
        assert theirs.is_dir()
        assert st.clean_staging() == 0  # both writers are alive
        assert mine.is_dir() and theirs.is_dir()
        os.kill(other.pid, signal.SIGKILL)
        other.wait(timeout=30)
        assert st.clean_staging() == 1 and not theirs.exists() and mine.is_dir()
    finally:
        other.kill()
        other.wait()
    st.discard(mine)
    assert not mine.exists() and st.clean_staging() == 0


def test_lock_is_exclusive_across_processes_and_dies_with_its_holder(tmp_path, caplog):
    st = Store(tmp_path, create=True)
    holder = _child("""
import sys
from variants.store import Store
with Store(sys.argv[1]).lock("holding for the test"):
    print("held", flush=True)
    sys.stdin.read()
""", str(tmp_path), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(StoreLockedError, match=f"pid {holder.pid} \\(holding for the test"), \
                st.lock("waiting", timeout=0.5):
            pass
        assert time.monotonic() - t0 >= 0.5
        assert f"locked by pid {holder.pid}" in caplog.text and "waiting up to 0.5 s" in caplog.text
        os.kill(holder.pid, signal.SIGKILL)  # a holder killed -9 drops the lock at once
        holder.wait(timeout=30)
        with st.lock("after", timeout=5):
            assert json.loads(st.lock_path.read_text())["pid"] == os.getpid()
    finally:
        holder.kill()
        holder.wait()
    assert st.lock_path.read_text() == ""  # released: no holder to name


def test_lock_is_reentrant_in_a_thread_and_exclusive_between_threads(tmp_path):
    st = Store(tmp_path, create=True)
    got = []

    def other():
        try:
            with st.lock("other thread", timeout=0.2):
                got.append("other")
        except StoreLockedError as e:
            got.append(str(e))

    with st.lock("outer"):
        with st.lock("inner"):  # the same thread may nest (generate -> commit)
            t = threading.Thread(target=other)
            t.start()
            t.join()
        assert "another thread of this process" in got[0]
    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert got[1] == "other"

