"""Request/budget trace CSV I/O, its error messages, and the synthetic generators."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adaptive.errors import AdaptiveError
from adaptive.traces import (
    BudgetTrace,
    RequestTrace,
    TraceError,
    list_trace_kinds,
    read_budget,
    read_requests,
    synth,
    validate_models,
    write_budget,
    write_requests,
)


def _write(tmp_path, text: str, name: str = "t.csv") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


# --- request CSV ------------------------------------------------------------------------------


def test_round_trip_with_and_without_batch(tmp_path):
    tr = RequestTrace.from_names([0.0, 0.1, 0.1, 2.5, 1e6 / 3], ["a", "b", "a", "c", "b"],
                                 models=["a", "b", "c"])
    p = tmp_path / "r.csv"
    write_requests(tr, p)
    assert p.read_text().splitlines()[0] == "timestamp_s,model"
    back = read_requests(p)
    assert back == tr  # exact floats, same first-appearance order
    assert back.source == str(p)

    tb = RequestTrace(tr.timestamps, tr.model, [1, 4, 1, 2, 1], tr.models)
    write_requests(tb, p)
    assert p.read_text().splitlines()[0] == "timestamp_s,model,batch"
    assert read_requests(p) == tb


def test_write_is_atomic_and_replaces(tmp_path):
    p = tmp_path / "r.csv"
    p.write_text("old")
    write_requests(synth("zipf", 5, 100, seed=1), p)
    assert read_requests(p) is not None
    assert os.listdir(tmp_path) == ["r.csv"]  # no temp file left behind


def test_columns_in_any_order_and_extras_ignored(tmp_path):
    p = _write(tmp_path, "model,user,timestamp_s\na,u1,0.5\nb,u2,1.5\n")
    tr = read_requests(p)
    assert tr.models == ("a", "b")
    assert tr.timestamps.tolist() == [0.5, 1.5]
    assert tr.batch.tolist() == [1, 1]


@pytest.mark.parametrize("text, line, words", [
    ("timestamp_s,model\n0,a\n1,a,extra\n", 3, "expected 2 fields"),
    ("timestamp_s,model\n0,a\nsoon,b\n", 3, "is not a number"),
    ("timestamp_s,model\n0,a\n-1,b\n", 3, ">= 0"),
    ("timestamp_s,model\n0,a\nnan,b\n", 3, "finite"),
    ("timestamp_s,model\n0,a\n5,a\n4,b\n", 4, "sort the trace"),
    ("timestamp_s,model\n0,a\n1, \n", 3, "empty model name"),
    ("timestamp_s,model,batch\n0,a,1\n1,a,x\n", 3, "batch 'x' is not an integer"),
    ("timestamp_s,model,batch\n0,a,0\n", 2, "batch 0 must be >= 1"),
    ("timestamp_s,model\n0,a\n\n1,a\n", 3, "blank line"),
    ("time,model\n0,a\n", 1, "missing column(s) ['timestamp_s']"),
    ("", 1, "empty file"),
])
def test_request_errors_name_file_and_line(tmp_path, text, line, words):
    p = _write(tmp_path, text)
    with pytest.raises(TraceError) as e:
        read_requests(p)
    assert e.value.line == line
    assert str(e.value).startswith(f"{p}:{line}: ")
    assert words in str(e.value)
    assert isinstance(e.value, ValueError) and isinstance(e.value, AdaptiveError)


def test_trailing_blank_lines_are_fine(tmp_path):
    assert len(read_requests(_write(tmp_path, "timestamp_s,model\n0,a\n1,b\n\n\n"))) == 2


def test_validate_models_names_first_offending_line(tmp_path):
    p = _write(tmp_path, "timestamp_s,model\n0,a\n1,b\n2,zz\n3,yy\n4,zz\n")
    tr = read_requests(p)
    validate_models(tr, ["a", "b", "zz", "yy"])
    with pytest.raises(TraceError, match=r":4: unknown model 'zz' \(known: a, b\)") as e:
        validate_models(tr, ["a", "b"])
    assert e.value.line == 4
    # a trace built in memory has no file: the request index is named instead
    with pytest.raises(TraceError, match=r"request #2: unknown model 'zz'"):
        validate_models(RequestTrace.from_names([0, 1, 2], ["a", "b", "zz"]), ["a", "b"])


def test_in_memory_trace_is_validated():
    with pytest.raises(TraceError, match="earlier than"):
        RequestTrace.from_names([1.0, 0.5], ["a", "a"])
    with pytest.raises(TraceError, match="duplicate model names"):
        RequestTrace([0.0], [0], [1], ("a", "a"))
    with pytest.raises(TraceError, match="outside"):
        RequestTrace([0.0], [3], [1], ("a",))
    tr = synth("zipf", 3, 10, seed=0)
    with pytest.raises(ValueError):
        tr.timestamps[0] = 5.0  # read-only: a frozen trace cannot change under a simulation


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1e7, allow_nan=False),
                          st.sampled_from(["a", "b,c", 'q"x', "résumé"]),
                          st.integers(1, 64)), max_size=30))
def test_round_trip_property(tmp_path_factory, rows):
    rows.sort(key=lambda r: r[0])
    tr = RequestTrace.from_names([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    p = tmp_path_factory.mktemp("rt") / "t.csv"
    write_requests(tr, p)
    back = read_requests(p)
    assert back.names().tolist() == tr.names().tolist()
    assert np.array_equal(back.timestamps, tr.timestamps)
    assert np.array_equal(back.batch, tr.batch)


# --- budget CSV -------------------------------------------------------------------------------


def test_budget_round_trip_and_sizes(tmp_path):
    p = _write(tmp_path, "timestamp_s,budget_bytes\n0,512MiB\n10,1000\n20.5,1.5 GB\n")
    b = read_budget(p)
    assert b.budget_bytes.tolist() == [512 * 2**20, 1000, 1_500_000_000]
    assert [b.at(t) for t in (0, 5, 10, 15, 25)] == [512 * 2**20, 512 * 2**20, 1000, 1000,
                                                     1_500_000_000]
    out = tmp_path / "b2.csv"
    write_budget(b, out)
    assert read_budget(out) == b
    assert BudgetTrace.constant(7).at(123.0) == 7


@pytest.mark.parametrize("text, line, words", [
    ("timestamp_s,budget_bytes\n0,1GiB\n5,lots\n", 3, "neither an integer nor a size"),
    ("timestamp_s,budget_bytes\n0,1GiB\n5,12 parsecs\n", 3, "neither an integer nor a size"),
    ("timestamp_s,budget_bytes\n0,-5\n", 2, "must be >= 0"),
    ("timestamp_s,budget_bytes\n0,5\n0,6\n", 3, "not after"),
    ("timestamp_s,budget\n0,5\n", 1, "missing column(s) ['budget_bytes']"),
    ("timestamp_s,budget_bytes\n", 2, "at least one row"),
])
def test_budget_errors_name_file_and_line(tmp_path, text, line, words):
    p = _write(tmp_path, text)
    with pytest.raises(TraceError) as e:
        read_budget(p)
    assert str(e.value).startswith(f"{p}:{line}: ")
    assert words in str(e.value)


# --- generators -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list_trace_kinds())
def test_generators_are_deterministic_sorted_and_exact(kind):
    a = synth(kind, 20, 5000, seed=3, duration_s=600)
    assert a == synth(kind, 20, 5000, seed=3, duration_s=600)
    assert a != synth(kind, 20, 5000, seed=4, duration_s=600)
    assert len(a) == 5000
    assert a.models == tuple(f"m{k:02d}" for k in range(20))
    assert (np.diff(a.timestamps) >= 0).all()
    assert a.timestamps[0] >= 0 and a.timestamps[-1] < 600
    names = ["x", "y", "z"]
    assert synth(kind, names, 10, seed=0).models == tuple(names)
    assert len(synth(kind, 4, 0, seed=0)) == 0


def test_all_four_kinds_exist_and_unknown_kind_lists_them():
    assert {"zipf", "bursty", "diurnal", "azure"} <= set(list_trace_kinds())
    with pytest.raises(TraceError, match="unknown trace kind 'poisson'; known: azure"):
        synth("poisson", 3, 10, seed=0)


def _top_share(tr: RequestTrace, frac: float) -> float:
    c = np.sort(tr.counts())[::-1]
    return c[: max(1, int(len(c) * frac))].sum() / c.sum()


def _idle_fraction(tr: RequestTrace, window_s: float, duration_s: float) -> float:
    w = int(np.ceil(duration_s / window_s))
    busy = np.zeros((len(tr.models), w), dtype=bool)
    busy[tr.model, (tr.timestamps // window_s).astype(int)] = True
    return 1.0 - busy.mean()


def test_zipf_is_head_heavy():
    tr = synth("zipf", 50, 20000, seed=0)
    assert _top_share(tr, 0.1) > 0.45  # Zipf(1.1): the top 5 of 50 take about 55%
    assert (tr.counts() > 0).all()


def test_azure_is_mostly_idle_with_a_few_hot_models():
    tr = synth("azure", 50, 20000, seed=0)
    assert _idle_fraction(tr, 60, 3600) > 0.6  # most model-minutes see no request
    assert _top_share(tr, 0.1) > 0.6
    c = tr.counts()
    assert c.max() > 100 * max(np.median(c), 1)  # rates span orders of magnitude


def test_bursty_is_burstier_than_zipf():
    def dispersion(tr):  # variance/mean of per-model 10 s counts: 1 for Poisson
        counts = np.zeros((len(tr.models), 360))
        np.add.at(counts, (tr.model, (tr.timestamps // 10).astype(int)), 1)
        hot = np.argmax(tr.counts())
        return counts[hot].var() / counts[hot].mean()

    assert dispersion(synth("zipf", 10, 20000, seed=1)) < 2
    assert dispersion(synth("bursty", 10, 20000, seed=1)) > 5


def test_diurnal_follows_the_sine():
    tr = synth("diurnal", 5, 40000, seed=2, amplitude=0.8)
    first, second = (tr.timestamps < 1800).sum(), (tr.timestamps >= 1800).sum()
    # rate 1 + 0.8 sin: the first half-period carries (pi + 1.6) / (2 pi) ~ 75%
    assert 0.72 < first / (first + second) < 0.79
