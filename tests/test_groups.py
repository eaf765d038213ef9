"""Groups: served models over several bases (issue 17, part 1).

Fast tests on tiny real models: the session's random resnet10 (+int8) at 32x32 and a
resnet10 trained for one epoch on digits (+int8), grouped, profiled at batch 1, selected,
simulated and served through a real VariantCache. The resnet10/18/34 acceptance run is in
``test_groups_slow.py``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import profiler
from adaptive import VariantCache
from adaptive.catalog import candidates_from_catalog, demands_from_catalog
from adaptive.errors import AdaptiveError
from cli import main
from profiler.catalog import Catalog
from variants import GroupError, Store, UnknownNameError, group, list_groups
from variants.errors import KeyConflictError

MEMBERS = ["r10t", "r10t+int8", "resnet10", "resnet10+int8"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _copy(src: Store, dst: Path, pattern: str) -> None:
    (dst / "variants").mkdir(parents=True, exist_ok=True)
    for name in src.names(pattern):
        shutil.copytree(src.variant_dir(name), dst / "variants" / name, copy_function=os.link)


@pytest.fixture(scope="module")
def bases(tiny_store, tmp_path_factory):
    """A store with two resnet10 bases (random ``resnet10``, digits-trained ``r10t``), each
    with int8, and bert-tiny; no catalog, no groups."""
    root = tmp_path_factory.mktemp("bases")
    _copy(tiny_store, root, "resnet10")
    _copy(tiny_store, root, "resnet10+int8")
    _copy(tiny_store, root, "bert-tiny")
    weights = root / "r10t.safetensors"
    r = invoke("train", "resnet10", "--epochs", "1", "--out", weights)
    assert r.exit_code == 0, r.output
    r = invoke("generate", "resnet10", "--num-classes", "10", "--weights", weights,
               "--resolution", "32", "--quantize", "int8", "--name", "r10t", "--out", root)
    assert r.exit_code == 0, r.output
    return Store(root)


@pytest.fixture()
def store(bases, tmp_path):
    """A private copy of ``bases`` (its own groups and catalog)."""
    _copy(bases, tmp_path, "*")
    return Store(tmp_path)


@pytest.fixture(scope="module")
def profiled(bases, tmp_path_factory):
    """``bases``' resnets grouped as ``digits`` through the CLI and profiled at batch 1."""
    root = tmp_path_factory.mktemp("profiled")
    for m in MEMBERS:
        _copy(bases, root, m)
    r = invoke("group", "digits", *MEMBERS, "--out", root)
    assert r.exit_code == 0, r.output
    assert "profile the store" in r.output
    r = invoke("profile", root, "--batch", "1", "--runs", "2", "--warmup", "1")
    assert r.exit_code == 0, r.output
    return Store(root)


# --- the group file ---------------------------------------------------------------------------


def test_group_is_stored_atomically_and_listed(store):
    g = group(store.root, "digits", ["r10t+int8", "resnet10"])
    assert g.members == ("r10t+int8", "resnet10")
    assert g.keys == (store.get("r10t+int8").key, store.get("resnet10").key)
    assert [x.name for x in list_groups(store)] == ["digits"] == [x.name for x in store.groups()]
    assert store.group("digits") == g
    files = sorted(p.name for p in (store.root / "groups").iterdir())
    assert files == ["digits.json"]  # no temp file left behind
    data = json.loads((store.root / "groups" / "digits.json").read_text())
    assert data["group_version"] == 1 and data["members"] == ["r10t+int8", "resnet10"]

    r = invoke("list", store.root)
    assert r.exit_code == 0 and "digits" in r.output and "r10t+int8, resnet10" in r.output
    rows = {v["name"]: v for v in json.loads(invoke("list", store.root, "--json").output)}
    assert rows["resnet10"]["groups"] == ["digits"] and rows["r10t"]["groups"] == []

    # redefining needs --replace
    r = invoke("group", "digits", "r10t", "--out", store.root)
    assert r.exit_code == 2 and "already exists" in r.output
    r = invoke("group", "digits", "r10t", "r10t+int8", "--out", store.root, "--replace", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["members"] == ["r10t", "r10t+int8"]


@pytest.mark.parametrize("name, members, needle", [
    ("r10t", ["r10t", "resnet10"], "is a stored variant"),
    ("a+b", ["r10t"], "bad group name"),
    (".hidden", ["r10t"], "bad group name"),
    ("g", ["r10t", "r10t"], "listed twice"),
    ("g", ["r10t", "nothere"], "unknown variant 'nothere'"),
    ("g", ["r10t", "bert-tiny"], "member 'bert-tiny' answers task 'embedding'"),
])
def test_group_refuses_clashes_and_incompatible_members(store, name, members, needle):
    with pytest.raises((GroupError, UnknownNameError), match=needle.replace("+", r"\+")):
        group(store, name, members)
    r = invoke("group", name, *members, "--out", store.root)
    assert r.exit_code == 2, r.output
    assert needle in r.output
    assert not (store.root / "groups" / f"{name}.json").exists()


def test_group_refuses_a_model_name(store):
    store.remove("resnet10")  # still the base of resnet10+int8 and the model of r10t
    with pytest.raises(GroupError, match="'resnet10' is the name of a stored model"):
        group(store, "resnet10", ["r10t"])


def test_a_variant_cannot_take_a_group_name(store):
    import variants

    group(store, "r10x", ["r10t"])
    with pytest.raises(KeyConflictError, match="'r10x' is a group"):
        variants.generate("resnet10", store, name="r10x", num_classes=10, resolution=32)
    assert "r10x" not in store


def _accuracy_row(store, name, eval_set, accuracy):
    m = store.get(name)
    with Catalog(store.catalog_path) as cat:
        cat.upsert_accuracy({"variant_key": m.key, "variant": m.name, "device_type": "cpu",
                             "backend": "onnxruntime", "eval_set": eval_set, "status": "ok",
                             "samples": 64, "accuracy": accuracy, "fidelity": 1.0})


def test_group_refuses_members_evaluated_on_different_data(store):
    _accuracy_row(store, "r10t", "digits", 0.8)
    _accuracy_row(store, "resnet10", "random", None)
    with pytest.raises(GroupError, match="member 'resnet10' was evaluated on random but 'r10t' "
                                         "was evaluated on digits"):
        profiler.check_group_data(store, ["r10t", "resnet10"])
    r = invoke("group", "g", "r10t", "resnet10", "--out", store.root)
    assert r.exit_code == 2 and "'resnet10' was evaluated on random" in r.output
    # the Python API does not read the catalog; reading the catalog for the group refuses it
    group(store, "g", ["r10t", "resnet10"])
    with pytest.raises(AdaptiveError, match="member 'resnet10' was evaluated on random"):
        candidates_from_catalog(store)
    r = invoke("select", store.root, "--budget", "1GiB")
    assert r.exit_code == 1 and "'resnet10' was evaluated on random" in r.output
    r = invoke("show", store.root)
    assert r.exit_code == 0 and "warning: group 'g'" in r.output
    # an unprofiled member counts with the data `profile --eval auto` gives it: digits
    assert profiler.check_group_data(store, ["r10t", "r10t+int8"]) == "digits"
    # measured on the same data too: accepted
    _accuracy_row(store, "resnet10", "digits", 0.1)
    assert profiler.check_group_data(store, ["r10t", "resnet10"]) == "digits"


# --- profiled: catalog, select, simulate, cache --------------------------------------------------


def test_profile_measures_fidelity_to_the_most_accurate_member(profiled):
    (gp,) = profiler.load_group_profiles(profiled)
    assert gp.name == "digits" and gp.eval_set == "digits"
    acc = {p.name: p.accuracy for p in gp.members}
    assert [p.name for p in gp.members] == MEMBERS
    assert acc["r10t"] > 0.5 > acc["resnet10"]  # one epoch on digits vs random init
    assert gp.reference == max(MEMBERS, key=lambda n: (acc[n], -MEMBERS.index(n)))
    assert gp.fidelity[gp.reference] == 1.0
    assert gp.fidelity["r10t+int8" if gp.reference == "r10t" else "r10t"] > 0.9
    assert gp.fidelity["resnet10"] < 0.5  # a random model agrees with a trained one by chance
    assert gp.fidelity_metric == "top1_agreement"
    with Catalog(profiled.catalog_path) as cat:
        rows = cat.group_fidelity_rows("cpu", "onnxruntime")
    assert {r["variant"] for r in rows} == set(MEMBERS) - {gp.reference}

    r = invoke("show", profiled.root)
    assert r.exit_code == 0 and "groups" in r.output and "◆" in r.output
    rows = json.loads(invoke("show", profiled.root, "--json").output)
    by = {x["name"]: x for x in rows}
    assert by["resnet10"]["groups"] == {"digits": gp.fidelity["resnet10"]}


def test_catalog_serves_members_under_the_group_only(profiled):
    cands = candidates_from_catalog(profiled, batch=1)
    assert set(cands) == {"digits"}  # every profiled variant is a member
    assert {c.variant for c in cands["digits"]} == set(MEMBERS)
    acc = {p.name: p.accuracy for p in profiler.load_profiles(profiled)}
    assert {c.variant: c.accuracy for c in cands["digits"]} == pytest.approx(acc)
    with pytest.raises(AdaptiveError, match="r10t is served as part of group 'digits'"):
        demands_from_catalog(profiled, batch=1, floors={"r10t": 0.5})


def test_select_picks_the_most_accurate_member_that_fits(profiled):
    mem = {c.variant: c.memory_bytes for c in candidates_from_catalog(profiled, batch=1)["digits"]}
    small = max(mem["r10t+int8"], mem["resnet10+int8"])
    assert small < min(mem["r10t"], mem["resnet10"])  # int8 is smaller on CPU at batch 1
    budget = (small + min(mem["r10t"], mem["resnet10"])) // 2  # only the int8 members fit
    r = invoke("select", profiled.root, "--batch", "1", "--budget", budget, "--floor",
               "digits=0.5", "--json")
    assert r.exit_code == 0, r.output
    plan = json.loads(r.output)
    assert plan["plan"] == {"digits": "r10t+int8"} and plan["memory_bytes"] <= budget
    # a floor no fitting member meets is refused, naming the group
    r = invoke("select", profiled.root, "--batch", "1", "--budget", budget, "--floor",
               "digits=0.99")
    assert r.exit_code == 1 and "digits" in r.output
    # with room, the most accurate member (the reference, or its int8 twin on a tie)
    r = invoke("select", profiled.root, "--batch", "1", "--budget", "1GiB", "--floor",
               "digits=0.5", "--json")
    assert json.loads(r.output)["plan"]["digits"] in ("r10t", "r10t+int8")


def test_simulate_and_the_cache_serve_the_group_name(profiled, tmp_path):
    mem = {c.variant: c.memory_bytes for c in candidates_from_catalog(profiled, batch=1)["digits"]}
    budget = (mem["r10t+int8"] + mem["r10t"]) // 2
    trace = tmp_path / "t.csv"
    trace.write_text("timestamp_s,model\n" + "".join(f"{i * 0.5:.1f},digits\n"
                                                     for i in range(40)))
    r = invoke("simulate", "--store", profiled.root, "--trace", trace, "--budget", budget,
               "--batch", "1", "--floor", "digits=0.5", "--policies", "memadapt,lru", "--json")
    assert r.exit_code == 0, r.output
    res = {x["policy"]: x for x in json.loads(r.output)}
    assert res["memadapt"]["floor_violations"] == 0
    best_fitting = profiler.load_group_profiles(profiled)[0].quality("r10t+int8")
    assert 0.5 <= res["memadapt"]["mean_accuracy"] <= best_fitting + 1e-9

    r = invoke("replay", "--store", profiled.root, "--trace", trace, "--budget", budget,
               "--floor", "digits=0.5", "--max-requests", "10", "--json")
    assert r.exit_code == 0, r.output
    assert "digits" in r.output

    images = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)
    with VariantCache(profiled, budget=budget, floors={"digits": 0.5}, max_batch=1) as cache:
        res = cache.infer("digits", images)
        assert res.variant == "r10t+int8" and res.output.shape == (1, 10)
        assert cache.stats().models["digits"].requests == 1


def test_members_left_out_of_every_group_stay_their_base_model(profiled, tmp_path):
    _copy(profiled, tmp_path, "*")
    shutil.copy(profiled.catalog_path, tmp_path / "catalog.sqlite")
    st = Store(tmp_path)
    group(st, "digits", ["r10t", "r10t+int8", "resnet10+int8"], replace=True)
    cands = candidates_from_catalog(st, batch=1)
    assert {m: sorted(c.variant for c in cs) for m, cs in cands.items()} == {
        "digits": ["r10t", "r10t+int8", "resnet10+int8"], "resnet10": ["resnet10"]}


def test_unlabelled_members_are_compared_by_fidelity_to_the_first_listed(tiny_store, tmp_path):
    """bert-tiny and a second bert-tiny (another seed) on the built-in text: no labels, so the
    reference is the first member and the other's quality is its cosine to it."""
    import variants

    _copy(tiny_store, tmp_path, "bert-tiny*")
    variants.generate("bert-tiny", tmp_path, name="bert-tiny-b", seed=1)
    st = Store(tmp_path)
    members = ["bert-tiny-b", "bert-tiny", "bert-tiny+int8"]
    r = invoke("group", "text", *members, "--out", tmp_path)
    assert r.exit_code == 0, r.output
    r = invoke("profile", tmp_path, "--batch", "1", "--runs", "2", "--warmup", "1")
    assert r.exit_code == 0, r.output
    (gp,) = profiler.load_group_profiles(st)
    assert gp.eval_set == "text" and gp.reference == "bert-tiny-b"
    assert gp.fidelity_metric == "cosine"
    assert all(p.accuracy is None for p in gp.members)
    own = {p.name: p.fidelity for p in gp.members}  # to each member's own base
    assert own["bert-tiny"] == pytest.approx(1.0) and gp.fidelity["bert-tiny"] < 0.99
    cands = {c.variant: c.accuracy for c in candidates_from_catalog(st, batch=1)["text"]}
    # two random encoders: cosine about 0 (clipped at 0 as a quality)
    assert cands == pytest.approx({m: min(1.0, max(0.0, gp.fidelity[m])) for m in members})
    assert cands["bert-tiny-b"] == 1.0
