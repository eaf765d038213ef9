"""The store survives concurrent writers and crashes: real `memadapt` processes writing one
store at once, holding its lock, and killed with SIGKILL mid-run, then resumed.

Every run is the CLI in a subprocess on resnet10 at 32x32 (the smallest model the other
tests use); the state is read back from the store's folders and its SQLite catalog.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

import variants
from variants import Store

ROOT = Path(__file__).resolve().parent.parent
RESNET = ("resnet10", "--num-classes", "10", "--resolution", "32")
PROFILE = ("--batch", "1,2", "--runs", "3", "--warmup", "1", "--eval", "none")


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli", *args]


def _start(*args: str, log: Path) -> subprocess.Popen:
    """A `memadapt ...` process, its stdout and stderr into the file ``log``."""
    with open(log, "w") as f:  # the child writes to its own copy of the descriptor
        return subprocess.Popen(_cmd(*args), cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                text=True)


def _run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(*args), cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _json_out(text: str):
    """The JSON document a `--json` run printed (log lines may come before or after it)."""
    lines = text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.rstrip() in ("[", "{", "[]"))
    return json.JSONDecoder().raw_decode("".join(lines[start:]))[0]


def _wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 150,
              poll: float = 0.01):
    """Poll ``cond()`` until it is truthy; fail if ``proc`` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}")
        time.sleep(poll)
    pytest.fail(f"no {what} within {timeout} s")


def _verify_clean(root: Path, names: set[str]) -> None:
    """`memadapt list --verify` passes and lists exactly ``names``; nothing is left in .tmp."""
    out = _run("list", str(root), "--verify", "--json", timeout=60)
    assert out.returncode == 0, out.stderr
    assert {v["name"] for v in json.loads(out.stdout)} == names
    tmp = root / ".tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []


def _mtimes(root: Path) -> dict[str, int]:
    return {d.name: (d / "manifest.json").stat().st_mtime_ns
            for d in (root / "variants").iterdir() if (d / "manifest.json").is_file()}


@pytest.fixture(scope="module")
def base_store(tmp_path_factory) -> Store:
    """resnet10 and resnet10+int8, made once; tests work on copies."""
    root = tmp_path_factory.mktemp("base")
    variants.generate("resnet10", root, quantize=["int8"], num_classes=10, resolution=32)
    return Store(root)


def _copy(src: Store, dst: Path) -> Path:
    (dst / "variants").mkdir(parents=True)
    for name in src.names():
        shutil.copytree(src.variant_dir(name), dst / "variants" / name, copy_function=os.link)
    return dst


def test_concurrent_generates_into_one_store_both_succeed(tmp_path):
    """Two real `generate` runs with different variants of one base: the second waits for
    the first, finds the shared base stored and skips it, and nothing is lost."""
    root = tmp_path / "store"
    a = _start("generate", *RESNET, "--quantize", "int8", "--out", str(root), "--json",
               log=tmp_path / "a.log")
    b = _start("generate", *RESNET, "--quantize", "fp16", "--out", str(root), "--json",
               log=tmp_path / "b.log")
    assert a.wait(timeout=300) == 0, (tmp_path / "a.log").read_text()
    assert b.wait(timeout=300) == 0, (tmp_path / "b.log").read_text()
    ra = _json_out((tmp_path / "a.log").read_text())
    rb = _json_out((tmp_path / "b.log").read_text())
    base = [r["status"] for r in ra + rb if r["name"] == "resnet10"]
    assert sorted(base) == ["created", "skipped"]  # built once, not by both at a time
    assert {r["key"] for r in ra + rb if r["name"] == "resnet10"} == {Store(root).get(
        "resnet10").key}
    _verify_clean(root, {"resnet10", "resnet10+int8", "resnet10+fp16"})


def test_generate_waits_for_the_lock_and_names_its_holder(base_store, tmp_path):
    """While another process holds the store's lock, `generate` waits: with a short
    --lock-timeout it fails with exit 1 naming the holder's pid; with a long one it goes on
    as soon as the lock is released."""
    root = _copy(base_store, tmp_path / "store")
    st = Store(root)
    before = _mtimes(root)
    with st.lock("holding for the test"):
        short = _start("generate", *RESNET, "--quantize", "int8", "--out", str(root),
                       "--lock-timeout", "1", log=tmp_path / "short.log")
        long = _start("generate", *RESNET, "--quantize", "int8", "--out", str(root),
                      "--lock-timeout", "300", "--json", log=tmp_path / "long.log")
        assert short.wait(timeout=120) == 1
        text = (tmp_path / "short.log").read_text()
        assert f"locked by pid {os.getpid()} (holding for the test" in text
        assert "--lock-timeout" in text and "Traceback" not in text
        _wait_for(lambda: f"locked by pid {os.getpid()}" in (tmp_path / "long.log").read_text(),
                  long, "a waiting message from the patient run", poll=0.05)
        assert long.poll() is None  # still waiting while we hold the lock
    assert long.wait(timeout=120) == 0, (tmp_path / "long.log").read_text()
    out = _json_out((tmp_path / "long.log").read_text())
    assert [r["status"] for r in out] == ["skipped", "skipped"]
    assert _mtimes(root) == before
    _verify_clean(root, {"resnet10", "resnet10+int8"})


def test_generate_killed_after_its_first_variant_resumes(tmp_path):
    """SIGKILL a real `generate` while it builds its second variant (its staging folder
    exists, the first variant has landed); the re-run keeps the first (manifest untouched),
    sweeps the dead run's staging folder and makes only the rest."""
    root = tmp_path / "store"
    args = ("generate", *RESNET, "--quantize", "int8", "--out", str(root), "--json")
    proc = _start(*args, log=tmp_path / "first.log")
    try:
        _wait_for(lambda: (root / "variants" / "resnet10" / "manifest.json").is_file(), proc,
                  "the base variant")
        staged = _wait_for(lambda: [d for d in (root / ".tmp").iterdir()
                                    if d.name.startswith("resnet10+int8.")], proc,
                           "the int8 variant's staging folder")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    st = Store(root)
    assert st.names() == ["resnet10"], "the run should have been killed during int8"
    assert all(d.is_dir() for d in staged)  # the dead run's half-built folder is still there
    out = _run("list", str(root), "--verify", timeout=60)  # leftovers do not upset readers
    assert out.returncode == 0, out.stderr
    before = _mtimes(root)

    again = _run(*args)
    assert again.returncode == 0, again.stderr
    assert [(r["name"], r["status"]) for r in _json_out(again.stdout)] == [
        ("resnet10", "skipped"), ("resnet10+int8", "created")]
    assert _mtimes(root)["resnet10"] == before["resnet10"]  # finished work is not redone
    assert not any(d.exists() for d in staged)
    _verify_clean(root, {"resnet10", "resnet10+int8"})


def _batch_rows(catalog: Path) -> dict[tuple[str, int], dict]:
    try:
        con = sqlite3.connect(f"file:{catalog}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return {}
    try:
        con.row_factory = sqlite3.Row
        return {(r["variant"], r["batch"]): dict(r)
                for r in con.execute("SELECT * FROM batch_profiles")}
    except sqlite3.Error:  # not created yet
        return {}
    finally:
        con.close()


def test_profile_killed_after_its_first_row_resumes(base_store, tmp_path):
    """SIGKILL a real `profile` (the parent, as kill -9 does) once its first row is in the
    catalog; the re-run skips the rows it has (their timestamps unchanged), measures the
    rest, and leaves every variant with its memory fit."""
    import profiler
    from profiler.catalog import Catalog

    root = _copy(base_store, tmp_path / "store")
    catalog = root / "catalog.sqlite"
    args = ("profile", str(root), *PROFILE, "--json")
    proc = _start(*args, log=tmp_path / "first.log")
    try:
        _wait_for(lambda: _batch_rows(catalog), proc, "a first catalog row", poll=0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    first = _batch_rows(catalog)
    assert 1 <= len(first) < 4, "the run should have been killed midway"
    _verify_clean(root, {"resnet10", "resnet10+int8"})

    again = _run(*args)
    assert again.returncode == 0, again.stderr
    skipped = {(m["variant"], m["batch"]) for m in _json_out(again.stdout)
               if m["status"] == "skipped"}
    assert skipped == set(first)
    second = _batch_rows(catalog)
    assert set(second) == {(v, b) for v in ("resnet10", "resnet10+int8") for b in (1, 2)}
    assert all(r["status"] == "ok" for r in second.values())
    assert all(second[k]["measured_at"] == first[k]["measured_at"] for k in first)
    st = Store(root)
    keys = {st.get(n).key for n in st.names()}
    with Catalog(catalog) as cat:
        fp = cat.devices("cpu")[0]["fingerprint"]
        assert set(cat.fits(fp, "onnxruntime")) == keys

        # a kill between a variant's last row and its fit leaves rows without the fit:
        # the next run fits again without measuring anything
        with cat.transaction():
            cat.conn.execute("DELETE FROM memory_fits")
    res = profiler.profile(root, batches=(1, 2), runs=3, warmup=1, eval=None)
    assert {m.status for m in res} == {"skipped"}
    with Catalog(catalog) as cat:
        assert set(cat.fits(fp, "onnxruntime")) == keys
    assert _batch_rows(catalog) == second
    _verify_clean(root, {"resnet10", "resnet10+int8"})


def test_profile_runs_take_turns_but_do_not_wait_for_generate(base_store, tmp_path):
    """A second profile run of one store waits for the first (with a short --lock-timeout it
    fails with exit 1 naming the holder's pid, no traceback, nothing recorded); the store's
    writer lock, which generate holds, does not hold a profile run up."""
    root = _copy(base_store, tmp_path / "store")
    st = Store(root)
    with st.profile_lock("profiling for the test"):
        out = _run("profile", str(root), *PROFILE, "--lock-timeout", "0.5")
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"locked by pid {os.getpid()} (profiling for the test" in out.stderr
    assert "--lock-timeout" in out.stderr and "Traceback" not in out.stderr
    assert not (root / "catalog.sqlite").exists() or _rows(root) == 0
    with st.lock("generating for the test"):
        out = _run("profile", str(root), *PROFILE, "--variants", "resnet10", "--json",
                   "--lock-timeout", "0")
    assert out.returncode == 0, out.stdout + out.stderr
    assert _rows(root) == 2  # batch 1 and 2 of resnet10


def _rows(root: Path) -> int:
    with sqlite3.connect(root / "catalog.sqlite") as db:
        return db.execute("SELECT COUNT(*) FROM batch_profiles").fetchone()[0]
