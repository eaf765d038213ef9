"""onnxruntime load forms (issue 15): the optimised graph kept per device, host forms that
sessions compute on in place, tensors shared across sessions through a TensorPool, and the
torch backend's host form. Real ONNX files and real onnxruntime sessions on tiny models."""

from __future__ import annotations

import contextlib
import json
import os

import numpy as np
import pytest

import variants
from variants.backends import (
    OnnxSession,
    TorchHostForm,
    get_backend,
    host_form,
    host_nbytes,
    open_onnx,
    supports_pool,
)
from variants.errors import BackendError
from variants.ort_forms import (
    FORM,
    OrtHostForm,
    form_key,
    optimized_graph,
    ort_host_form,
    ort_tensor_index,
)
from variants.shared import TensorPool

ORT = get_backend("onnxruntime")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """resnet10 (32x32) with exit@2, and two bert-tiny task models on one backbone."""
    root = tmp_path_factory.mktemp("swaps")
    variants.generate("resnet10", root, exits=[2], num_classes=10, resolution=32,
                      recover_steps=0)
    for name, classes in (("task-a", 2), ("task-b", 3)):
        variants.generate("bert-tiny", root, name=name, num_classes=classes, recover_steps=0,
                          seed=0)
    return variants.Store(root)


def _x(name: str):
    if name.startswith("resnet"):
        return np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    ids = np.random.default_rng(0).integers(1000, 30000, (2, 8)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


@contextlib.contextmanager
def _emptied(path):
    """``path`` replaced by an empty file for the duration (the original moved aside, so
    sessions mapping it keep their pages)."""
    aside = path.with_name(path.name + ".aside")
    os.replace(path, aside)
    try:
        path.write_bytes(b"")
        yield
    finally:
        os.replace(aside, path)


def _ref(store, name):
    return open_onnx(store.get(name).onnx_path).run(_x(name))


@pytest.mark.parametrize("name", ["resnet10", "resnet10+exit2", "task-a"])
def test_optimized_graph_is_made_once_and_gives_the_same_outputs(store, name):
    m = store.get(name)
    g = optimized_graph(m, "cpu")
    assert g.folder.parent == m.path / "ort" and g.folder.name == form_key(m, "cpu")
    assert g.tensors and g.nbytes > 0.5 * m.bytes
    stamp = (g.folder / FORM).stat().st_mtime_ns
    assert optimized_graph(m, "cpu") == g and (g.folder / FORM).stat().st_mtime_ns == stamp
    s = ORT(m)
    assert isinstance(s, OnnxSession)
    np.testing.assert_allclose(s.run(_x(name)), _ref(store, name), rtol=1e-4, atol=1e-4)
    # the store still verifies: the form is beside the manifest's files, not among them
    store.verify(name)


def test_a_stale_form_is_rebuilt(store):
    m = store.get("resnet10")
    g = optimized_graph(m)
    meta = json.loads((g.folder / FORM).read_text())
    meta["form_version"] = -1  # as an older memadapt would have written it
    (g.folder / FORM).write_text(json.dumps(meta))
    g2 = optimized_graph(m)
    assert g2.folder == g.folder and g2 == g
    assert json.loads((g2.folder / FORM).read_text())["form_version"] != -1
    assert not [p for p in g.folder.parent.iterdir() if p.name.startswith(".")]
    assert form_key(m, "cuda:1") != form_key(m, "cpu")


def test_host_form_reloads_without_reading_the_tensor_file(store, tmp_path):
    m = store.get("resnet10")
    form = host_form(m, "onnxruntime", "cpu")
    assert isinstance(form, OrtHostForm)
    assert host_nbytes(form) == len(form.graph_bytes) + form.graph.nbytes
    with _emptied(form.graph.tensors_path):  # a session reading the file would fail
        s = ORT(m, source=form)
        np.testing.assert_allclose(s.run(_x("resnet10")), _ref(store, "resnet10"),
                                   rtol=1e-4, atol=1e-4)
        with pytest.raises(BackendError):
            ORT(m)  # from the file: ORT reads the (now empty) tensor file


def test_plain_onnx_bytes_still_load(store):
    m = store.get("resnet10")
    s = ORT(m, source=m.onnx_path.read_bytes())
    np.testing.assert_allclose(s.run(_x("resnet10")), _ref(store, "resnet10"), rtol=1e-5)


def test_pooled_sessions_hold_identical_tensors_once(store):
    assert supports_pool("onnxruntime") and supports_pool("torch")
    a, b = store.get("task-a"), store.get("task-b")
    ia, ib = ort_tensor_index(a), ort_tensor_index(b)
    common = set(ia.values()) & set(ib.values())
    assert sum(k.nbytes for k in common) > 0.9 * sum(k.nbytes for k in set(ib.values()))
    pool = TensorPool("cpu")
    sa = ORT(a, pool=pool)
    assert sa.read_bytes == sum(k.nbytes for k in set(ia.values()))
    sb = ORT(b, pool=pool)
    assert sb.read_bytes == sum(k.nbytes for k in set(ib.values()) - common)
    assert pool.bytes() == sum(k.nbytes for k in set(ia.values()) | set(ib.values()))
    np.testing.assert_allclose(sa.run(_x("task-a")), _ref(store, "task-a"), rtol=1e-3,
                               atol=1e-4)
    np.testing.assert_allclose(sb.run(_x("task-b")), _ref(store, "task-b"), rtol=1e-3,
                               atol=1e-4)
    sa.close()
    assert pool.bytes() == sum(k.nbytes for k in set(ib.values()))
    np.testing.assert_allclose(sb.run(_x("task-b")), _ref(store, "task-b"), rtol=1e-3,
                               atol=1e-4)
    sb.close()
    assert pool.bytes() == 0 and len(pool) == 0


def test_downgrade_to_an_exit_takes_the_prefix_from_the_pool(store):
    full, ex = store.get("resnet10"), store.get("resnet10+exit2")
    pool = TensorPool("cpu")
    resident = ORT(full, pool=pool, source=host_form(full, "onnxruntime"))
    assert resident.read_bytes == optimized_graph(full).nbytes  # from the form, not the file
    index = ort_tensor_index(ex)
    head = ort_host_form(ex, exclude=pool.held(index.values()))
    shared = pool.held(index.values())
    assert shared and set(head.arrays) == {n for n, k in index.items() if k not in shared}
    # neither the stored graph nor its tensors are read: the head's graph bytes are in memory
    with _emptied(head.graph.tensors_path), _emptied(head.graph.graph_path):
        small = ORT(ex, pool=pool, source=head)
    assert small.read_bytes == sum(a.nbytes for a in head.arrays.values())
    before = pool.bytes()
    resident.close()
    assert pool.bytes() < before  # the tail went with the full model
    np.testing.assert_allclose(small.run(_x("resnet10")), _ref(store, "resnet10+exit2"),
                               rtol=1e-3, atol=1e-4)
    small.close()
    assert pool.bytes() == 0


def test_optimised_cpu_sessions_open_without_the_buffer_reuse_pass(store, monkeypatch):
    import variants.backends as backends

    m = store.get("resnet10+exit2")
    form = host_form(m, "onnxruntime")
    opened = [ORT(m), ORT(m, source=form), ORT(m, pool=TensorPool("cpu"), source=form)]
    assert [s._sess.get_session_options().enable_mem_reuse for s in opened] == [False] * 3
    assert open_onnx(m.onnx_path)._sess.get_session_options().enable_mem_reuse  # (optimising)
    monkeypatch.setattr(backends, "CPU_MEM_REUSE", True)
    assert ORT(m, source=form)._sess.get_session_options().enable_mem_reuse
    for s in opened:
        np.testing.assert_allclose(s.run(_x("resnet10")), _ref(store, "resnet10+exit2"),
                                   rtol=1e-3, atol=1e-4)


def test_the_stored_graph_keeps_no_intermediate_shapes(store):
    import onnx

    for name in ("resnet10+exit2", "task-a"):
        g = optimized_graph(store.get(name))
        model = onnx.load(str(g.graph_path), load_external_data=False)
        assert not model.graph.value_info and model.graph.output[0].type.tensor_type.elem_type
        assert g.index() == {t.name: t.key for t in g.tensors}
        g.index().clear()  # a caller's copy: the graph's own stays whole
        assert len(g.index()) == len(g.tensors)


def test_onnxruntime_pool_is_cpu_only(store):
    with pytest.raises(BackendError, match="CPU only"):
        ORT(store.get("resnet10"), pool=TensorPool("cuda"), device="cpu")


def test_torch_host_form_reloads_the_same_model(store):
    m = store.get("resnet10")
    form = host_form(m, "torch", "cpu")
    assert isinstance(form, TorchHostForm)
    assert host_nbytes(form) == sum(t.numel() * t.element_size() for t in form.tensors.values())
    torch_f = get_backend("torch")
    from_file = torch_f(m).run(_x("resnet10"))
    from_host = torch_f(m, source=form)
    np.testing.assert_allclose(from_host.run(_x("resnet10")), from_file, rtol=1e-5, atol=1e-6)
    # on the CPU the re-loaded module computes on the host form's tensors
    ptrs = {t.data_ptr() for t in form.tensors.values()}
    assert all(p.data_ptr() in ptrs for p in from_host.module.parameters())
