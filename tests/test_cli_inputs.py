"""Bad input to the commands that make and measure variants exits 2 and says what is allowed
(README: "Bad input ... exits with code 2 and says what is allowed")."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

import profiler
import variants
from cli import main
from variants.errors import DataError


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    variants.generate("resnet10", root, num_classes=10, resolution=32)
    return root


def test_profile_with_an_eval_set_that_does_not_exist_exits_2(store):
    r = CliRunner().invoke(main, ["profile", str(store), "--eval", "/no/such.npz"])
    assert r.exit_code == 2, r.output
    assert "'/no/such.npz' is neither one of auto, digits" in r.output
    with pytest.raises(profiler.ProfilerError) as e:  # still the profiler's error type
        profiler.profile(store, eval="/no/such.npz")
    assert isinstance(e.value, DataError)
