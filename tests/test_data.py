"""Calibration and evaluation data sources."""

import numpy as np
import pytest

from variants import DataError, get_family
from variants.data import calibration, load_data


def test_digits_splits_are_disjoint_and_labelled():
    tr, ca, ev = (load_data("digits", s) for s in ("train", "calib", "eval"))
    assert (len(tr), len(ca), len(ev)) == (1197, 200, 400)
    assert ev.labels is not None and set(np.unique(ev.labels)) == set(range(10))
    assert not (set(map(bytes, tr.inputs.reshape(len(tr), -1))) &
                set(map(bytes, ev.inputs.reshape(len(ev), -1))))


def test_text_corpus_is_builtin_and_deterministic():
    a, b = load_data("text", "eval"), load_data("text", "eval")
    assert len(a) > 100 and list(a.inputs) == list(b.inputs)
    assert all(isinstance(t, str) and len(t) >= 30 for t in a.inputs)


def test_user_npz_trains_on_80_and_holds_out_20(tmp_path):
    x = np.random.default_rng(0).random((50, 1, 8, 8)).astype(np.float32)
    y = np.arange(50) % 10
    np.savez(tmp_path / "d.npz", x=x, y=y)
    path = str(tmp_path / "d.npz")
    tr, ho = load_data(path, "train"), load_data(path, "heldout")
    assert (len(tr), len(ho)) == (40, 10)
    assert sorted([*tr.inputs[:, 0, 0, 0],
                                                           *ho.inputs[:, 0, 0, 0]]) == \
        sorted(x[:, 0, 0, 0])
    # a file given for evaluation or calibration is used whole
    assert len(load_data(path, "eval")) == len(load_data(path, "calib")) == 50


@pytest.mark.parametrize("content,needle", [
    ({"z": np.zeros(3)}, "expected inputs under 'x'"),
    ({"x": np.zeros((3, 8, 8)), "y": np.zeros(2)}, "3 inputs but 2 labels"),
])
def test_bad_npz_says_what_is_expected(tmp_path, content, needle):
    np.savez(tmp_path / "bad.npz", **content)
    with pytest.raises(DataError, match=needle):
        load_data(str(tmp_path / "bad.npz"))


def test_unknown_source_and_format(tmp_path):
    with pytest.raises(DataError, match="neither a built-in name"):
        load_data("nosuch")
    (tmp_path / "a.csv").write_text("1,2")
    with pytest.raises(DataError, match=".npz, .npy, .txt"):
        load_data(str(tmp_path / "a.csv"))


def test_calibration_batches_are_model_ready():
    fam = get_family("resnet")
    arch = fam.build("resnet10", num_classes=10, resolution=32).arch
    cal = calibration(fam, arch, "digits", samples=32, batch=16)
    assert len(cal) == 2 and cal.batches[0][0].shape == (16, 3, 32, 32)
    bert = get_family("bert")
    barch = bert.build("bert-tiny").arch
    ids, mask = calibration(bert, barch, "text", samples=8, batch=8).batches[0]
    assert ids.shape == mask.shape and ids.shape[0] == 8
    rnd = calibration(fam, arch, "random", samples=32, batch=16)
    assert rnd.batches[0][0].shape == (16, 3, 32, 32)  # the serving resolution
