"""Served models made of several bases: a *group* names stored variants of different base
models (``resnet10``, ``resnet18+int8``, ``resnet34``) that answer one task, so the cache can
choose among them as it chooses among one model's variants (INFaaS's and Proteus's
"model families as variants of one task").

A group is one small JSON file, ``STORE/groups/<name>.json``, written with an atomic
rename. Its members are listed explicitly (a member's other stored variants are not added).
A group name is a served model name: it may not be a stored variant's name or a model's.

Members must be interchangeable for a client: the same task, the same inputs and, for
classifiers, the same number of classes. That they were *evaluated* on the same data is
checked where evaluations live (``profiler.check_group_data``, run by ``memadapt group``,
and again whenever the catalog is read for a group).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from variants.errors import StoreError, UnknownNameError

GROUPS_DIR = "groups"
GROUP_VERSION = 1
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")


class GroupError(StoreError, ValueError):
    """A group is invalid: bad name, clashing name, unknown or incompatible members
    (bad input: CLI exit 2)."""


@dataclass(frozen=True)
class Group:
    """A served model whose candidates are ``members`` (stored variant names, in the order
    given; ``keys`` are their variant keys when the group was made)."""

    name: str
    members: tuple[str, ...]
    keys: tuple[str, ...] = ()
    task: str = "classification"
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"group_version": GROUP_VERSION, "name": self.name, "members": list(self.members),
                "keys": list(self.keys), "task": self.task, "created": self.created}

    @classmethod
    def from_dict(cls, d: dict[str, Any], path: Path | None = None) -> Group:
        try:
            if int(d.get("group_version", 1)) > GROUP_VERSION:
                raise StoreError(f"group file {path} was written by a newer memadapt; upgrade")
            return cls(name=str(d["name"]), members=tuple(str(m) for m in d["members"]),
                       keys=tuple(str(k) for k in d.get("keys", ())),
                       task=str(d.get("task", "classification")), created=str(d.get("created", "")))
        except (KeyError, TypeError, ValueError) as e:
            raise StoreError(f"group file {path} is malformed ({type(e).__name__}: {e}); delete "
                             f"it and run `memadapt group` again") from None


def groups_dir(store) -> Path:
    return Path(store.root) / GROUPS_DIR


def list_groups(store) -> list[Group]:
    """The store's groups, by name."""
    d = groups_dir(store)
    if not d.is_dir():
        return []
    return [get_group(store, p.stem) for p in sorted(d.glob("*.json"))
            if not p.name.startswith(".")]


def get_group(store, name: str) -> Group:
    path = groups_dir(store) / f"{name}.json"
    if not _NAME.match(name) or not path.is_file():
        raise UnknownNameError("group", name, [p.stem for p in sorted(groups_dir(store).glob(
            "*.json"))] if groups_dir(store).is_dir() else [])
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise StoreError(f"{path} is not valid JSON ({e}); delete it and run `memadapt group` "
                         f"again") from None
    return Group.from_dict(data, path)


def is_group(store, name: str) -> bool:
    return bool(_NAME.match(name)) and (groups_dir(store) / f"{name}.json").is_file()


def check_members(store, members) -> list:
    """The members' manifests, after checking that they exist, are distinct and are
    interchangeable (task, inputs, classes); a GroupError names the first that is not."""
    members = list(members)
    if not members:
        raise GroupError("a group needs at least one member (a stored variant name)")
    dup = sorted({m for m in members if members.count(m) > 1})
    if dup:
        raise GroupError(f"members listed twice: {', '.join(dup)}")
    stored = store.names()
    missing = [m for m in members if m not in stored]
    if missing:
        raise UnknownNameError("variant", missing[0], stored)
    ms = [store.get(m) for m in members]
    ref = ms[0]
    for m in ms[1:]:
        if m.task != ref.task:
            raise GroupError(f"member {m.name!r} answers task {m.task!r} and {ref.name!r} "
                             f"task {ref.task!r}; a group's members must answer one task")
        sig, ref_sig = _inputs(m), _inputs(ref)
        if sig != ref_sig:
            raise GroupError(f"member {m.name!r} takes inputs {sig} and {ref.name!r} takes "
                             f"{ref_sig}; a group's members must accept the same requests")
        nc, ref_nc = m.arch.get("num_classes"), ref.arch.get("num_classes")
        if m.task == "classification" and nc is not None and ref_nc is not None and nc != ref_nc:
            raise GroupError(f"member {m.name!r} has {nc} classes and {ref.name!r} {ref_nc}; a "
                             f"group's classifiers must share their labels")
    return ms


def _inputs(m) -> list[tuple[str, str, int]]:
    return [(i["name"], i["dtype"], len(i["shape"])) for i in m.inputs]


def add_group(store, name: str, members, *, replace: bool = False) -> Group:
    """Store group ``name`` over ``members`` (stored variant names) and return it.

    Refuses (GroupError) a bad or clashing name (a stored variant, a model, or an existing
    group unless ``replace``) and members that are not interchangeable
    (:func:`check_members`). The file is written to a temp file and renamed into place.
    """
    from variants.store import atomic_write_text, now

    if not isinstance(name, str) or not _NAME.match(name) or "+" in name:
        raise GroupError(f"bad group name {name!r}: use letters, digits, '_', '-' and '.', not "
                         f"starting with '.' or containing '+' (it reads as a variant chain)")
    ms = check_members(store, members)
    stored = store.manifests()
    if any(m.name == name for m in stored):
        raise GroupError(f"{name!r} is a stored variant; a group needs a name of its own")
    models = sorted({m.base for m in stored} | {m.model for m in stored})
    if name in models:
        raise GroupError(f"{name!r} is the name of a stored model; a group needs a name of its "
                         f"own (models: {', '.join(models)})")
    if is_group(store, name) and not replace:
        raise GroupError(f"group {name!r} already exists with members "
                         f"{', '.join(get_group(store, name).members)}; pass replace=True "
                         f"(memadapt group --replace) to redefine it")
    g = Group(name, tuple(m.name for m in ms), tuple(m.key for m in ms), ms[0].task, now())
    d = groups_dir(store)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_text(d / f"{name}.json", json.dumps(g.to_dict(), indent=2, sort_keys=True))
    return g


def remove_group(store, name: str) -> None:
    get_group(store, name)
    (groups_dir(store) / f"{name}.json").unlink()


def group(store, name: str, members, *, replace: bool = False) -> Group:
    """``variants.group("store", "digits", ["resnet10", "resnet18+int8", ...])``: see
    :func:`add_group` (``store`` may be a path)."""
    from variants.store import Store

    st = store if isinstance(store, Store) else Store(store)
    return add_group(st, name, members, replace=replace)
