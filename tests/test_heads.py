"""Task heads on one frozen backbone: label sets, training, `memadapt generate --heads`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import variants
from cli import main
from variants.errors import DataError
from variants.heads import list_label_sets, load_label_set, train_head
from variants.shared import sharing_groups, tensor_index

WORDS = {"fruit": ["apple", "pear", "plum", "cherry", "grape", "melon"],
         "tool": ["hammer", "saw", "drill", "wrench", "chisel", "pliers"]}


def _tsv(path, labels=("fruit", "tool"), n=12):
    rng = np.random.default_rng(len(str(path)))
    lines = []
    for label in labels:
        words = WORDS[label]
        for i in range(n):
            pick = rng.choice(words, 3)
            lines.append(f"the {pick[0]} and the {pick[1]} near a {pick[2]} {i}\t{label}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_built_in_label_sets_label_the_corpus():
    assert set(list_label_sets()) == {"topic", "module"}
    for name in list_label_sets():
        ls = load_label_set(name)
        assert len(ls.classes) >= 5 and len(ls.texts) == len(ls.labels) > 500
        counts = np.bincount(ls.labels, minlength=len(ls.classes))
        assert counts.min() >= 50  # every class has real support
        train, held = ls.split(0)
        assert not set(train.texts) & set(held.texts)
        assert abs(len(held.texts) / len(ls.texts) - 0.3) < 0.02
        assert ls.digest() == load_label_set(name).digest()  # deterministic


def test_label_file_errors(tmp_path):
    with pytest.raises(DataError, match="built-in"):
        load_label_set("nonsense")
    with pytest.raises(DataError, match="does not exist"):
        load_label_set(str(tmp_path / "missing.tsv"))
    bad = tmp_path / "bad.tsv"
    bad.write_text("no tab on this line\n")
    with pytest.raises(DataError, match="bad.tsv:1"):
        load_label_set(str(bad))
    one = tmp_path / "one.tsv"
    one.write_text("".join(f"text {i}\tonly\n" for i in range(10)))
    with pytest.raises(DataError, match="at least 2"):
        load_label_set(str(one))


def test_train_head_keeps_the_backbone_and_learns(tmp_path):
    ls = load_label_set(str(_tsv(tmp_path / "things.tsv")))
    res = train_head("bert-tiny", ls, tmp_path / "head", epochs=300)  # 1 batch an epoch
    assert res.classes == ("fruit", "tool")
    assert res.train_accuracy >= 0.9  # separable by word identity
    assert (tmp_path / "head" / "config.json").is_file()
    cfg = json.loads((tmp_path / "head" / "config.json").read_text())
    assert cfg["id2label"] == {"0": "fruit", "1": "tool"}


def test_cli_heads_make_task_models_that_share_the_backbone(tmp_path):
    a = _tsv(tmp_path / "things.tsv")
    b = _tsv(tmp_path / "more.tsv", n=8)
    store = tmp_path / "s"
    runner = CliRunner()
    r = runner.invoke(main, ["generate", "bert-tiny", "--heads", f"{a},{b}", "--out", str(store),
                             "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert [o["model"] for o in out] == ["bert-tiny-things", "bert-tiny-more"]
    s = variants.Store(store)
    idx = {m: tensor_index(s.get(m).weights_path) for m in ("bert-tiny-things", "bert-tiny-more")}
    sg = sharing_groups(idx)
    total = sum(k.nbytes for k in set(idx["bert-tiny-things"].values()))
    # everything but the pooler and the classifier is one shared group
    assert sg.private["bert-tiny-things"] < 0.05 * total
    assert sum(sg.groups.values()) > 0.9 * total
    # they run, with their own number of classes
    for m in ("bert-tiny-things", "bert-tiny-more"):
        ids = np.full((2, 6), 1012, dtype=np.int64)
        y = variants.open_session(s, m).run({"input_ids": ids, "attention_mask": np.ones_like(ids)})
        assert y.shape == (2, 2)
    # select --share charges the backbone once: both fit where separately only one would
    from adaptive import Candidate, ModelDemand
    from adaptive.catalog import demands_to_json

    models = ("bert-tiny-things", "bert-tiny-more")
    size = {m: sg.standalone_bytes(m) for m in models}
    demands = [ModelDemand(m, [Candidate(m, size[m] + 1000, 0.9)]) for m in models]
    prof = tmp_path / "profiles.json"
    prof.write_text(json.dumps(demands_to_json(demands)))
    budget = max(size.values()) + sum(sg.private.values()) + 10_000
    assert budget < sum(size.values())  # separately, only one fits
    budget = str(budget)
    args = ["select", str(store), "--profiles", str(prof), "--budget", budget, "--json"]
    plain = json.loads(runner.invoke(main, args).output)
    assert sum(v is not None for v in plain["plan"].values()) == 1
    r = runner.invoke(main, [*args, "--share", "--backend", "torch"])
    assert r.exit_code == 0, r.output
    shared = json.loads(r.output)
    assert shared["plan"] == {m: m for m in models}
    assert shared["memory_bytes"] <= int(budget)
    assert sum(shared["shared_groups"].values()) == sum(sg.groups.values())
    r = runner.invoke(main, [*args, "--share"])
    assert r.exit_code == 2 and "--backend torch" in r.output
    # re-running reuses the trained heads and skips the stored variants
    r = runner.invoke(main, ["generate", "bert-tiny", "--heads", f"{a},{b}", "--out", str(store),
                             "--json"])
    again = json.loads(r.output)
    assert all(o["reused"] for o in again)
    assert {v["status"] for o in again for v in o["variants"]} == {"skipped"}
    # other labels under the same name: refused with what to do, nothing stored is lost
    _tsv(a, n=10)
    r = runner.invoke(main, ["generate", "bert-tiny", "--heads", str(a), "--out", str(store)])
    assert r.exit_code == 1 and "made from other labels" in r.output
    assert variants.Store(store).get("bert-tiny-things").key == out[0]["variants"][0]["key"]


@pytest.mark.parametrize("args, message", [
    (["resnet10", "--heads", "topic"], "BERT family"),
    (["bert-tiny", "--heads", "topic", "--num-classes", "3"], "drop --num-classes"),
    (["bert-tiny", "--heads", "nonsense"], "unknown label set"),
    (["bert-tiny", "--heads", " , "], "give label sets"),
])
def test_cli_heads_bad_input_exits_2(tmp_path, args, message):
    r = CliRunner().invoke(main, ["generate", *args, "--out", str(tmp_path / "s")])
    assert r.exit_code == 2, r.output
    assert message in r.output
