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

from variants._groupfile import NAME, Group, group_path, is_group, read_group
from variants.errors import StoreError, UnknownNameError
from variants.store import Store, atomic_write_text, now

__all__ = ["Group", "GroupError", "add_group", "check_members", "get_group", "group",
           "list_groups", "remove_group"]


class GroupError(StoreError, ValueError):
    """A group is invalid: bad name, clashing name, unknown or incompatible members
    (bad input: CLI exit 2)."""


def _store(store) -> Store:
    return store if isinstance(store, Store) else Store(store)


def list_groups(store) -> list[Group]:
    """The store's groups, by name (= ``Store.groups()``)."""
    return _store(store).groups()


def get_group(store, name: str) -> Group:
    return read_group(_store(store).root, name)


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
    """Store group ``name`` over ``members`` (stored variant names) in ``store`` (a Store or
    its path) and return it.

    Refuses (GroupError) a bad or clashing name (a stored variant, a model, or an existing
    group unless ``replace``) and members that are not interchangeable
    (:func:`check_members`). The file is written to a temp file and renamed into place.
    """
    store = _store(store)
    if not isinstance(name, str) or not NAME.match(name) or "+" in name:
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
    if is_group(store.root, name) and not replace:
        raise GroupError(f"group {name!r} already exists with members "
                         f"{', '.join(get_group(store, name).members)}; pass replace=True "
                         f"(memadapt group --replace) to redefine it")
    g = Group(name, tuple(m.name for m in ms), tuple(m.key for m in ms), ms[0].task, now())
    path = group_path(store.root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(g.to_dict(), indent=2, sort_keys=True))
    return g


def remove_group(store, name: str) -> None:
    store = _store(store)
    read_group(store.root, name)
    group_path(store.root, name).unlink()


#: ``variants.group("store", "digits", ["resnet10", "resnet18+int8", "resnet34"])``
group = add_group
