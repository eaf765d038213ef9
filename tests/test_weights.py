"""Weights files given to ``generate --weights``: anything but the model's state dict is bad
input (exit 2) with a message that says what the file holds and how to save a good one."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import variants
from cli import main
from variants.errors import DataError
from variants.weights import load_state_dict_file, load_weights_into


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import torch

    d = tmp_path_factory.mktemp("weights")
    torch.save([1, 2, 3], d / "list.pt")
    torch.save({"a": 1}, d / "not-tensors.pt")
    torch.save({"fc.weight": torch.zeros(3, 3)}, d / "other-model.pt")
    (d / "empty.pt").write_bytes(b"")
    (d / "garbage.safetensors").write_text("garbage")
    built = variants.get_family("resnet").build("resnet10", num_classes=10, resolution=32)
    torch.save(built.module.state_dict(), d / "resnet10-10.pt")
    return d


@pytest.mark.parametrize("name, message", [
    ("list.pt", "holds a list, not a state dict"),
    ("not-tensors.pt", "entries are not name -> tensor"),
    ("other-model.pt", "does not hold 'resnet10' weights: 73 of the model's tensors are missing"),
    ("empty.pt", "cannot read weights"),
    ("garbage.safetensors", "is not a safetensors file"),
    ("resnet10-10.pt", "pass --num-classes to match its classifier"),
    ("missing.pt", "does not exist"),
])
def test_bad_weights_exit_2_saying_what_is_wrong(files, tmp_path, name, message):
    r = CliRunner().invoke(main, ["generate", "resnet10", "--weights", str(files / name),
                                  "--out", str(tmp_path / "s")])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output
    assert "list index out of range" not in r.output


def test_the_models_own_weights_load(files):
    import torch

    built = variants.get_family("resnet").build("resnet10", num_classes=10, resolution=32,
                                                weights=str(files / "resnet10-10.pt"))
    want = torch.load(files / "resnet10-10.pt", weights_only=True)
    got = built.module.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(DataError, match="save one with torch.save"):
        load_state_dict_file(files / "list.pt")
    with pytest.raises(DataError, match="another shape"):
        load_weights_into(variants.get_family("resnet").build("resnet10").module,
                          files / "resnet10-10.pt", model="resnet10")
