"""Reading group files (``STORE/groups/<name>.json``), below :mod:`variants.store` so the store
can list its groups; making and checking groups is :mod:`variants.groups`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from variants.errors import StoreError, UnknownNameError

GROUPS_DIR = "groups"
GROUP_VERSION = 1
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")


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


def group_path(root: str | Path, name: str) -> Path:
    return Path(root) / GROUPS_DIR / f"{name}.json"


def group_names(root: str | Path) -> list[str]:
    d = Path(root) / GROUPS_DIR
    return sorted(p.stem for p in d.glob("*.json") if not p.name.startswith(".")) \
        if d.is_dir() else []


def is_group(root: str | Path, name: str) -> bool:
    return bool(NAME.match(name)) and group_path(root, name).is_file()


def read_group(root: str | Path, name: str) -> Group:
    if not is_group(root, name):
        raise UnknownNameError("group", name, group_names(root))
    path = group_path(root, name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise StoreError(f"{path} is not valid JSON ({e}); delete it and run `memadapt group` "
                         f"again") from None
    return Group.from_dict(data, path)


def read_groups(root: str | Path) -> list[Group]:
    return [read_group(root, n) for n in group_names(root)]
