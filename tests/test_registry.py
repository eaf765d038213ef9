"""One Registry for every extension point: its rules, and every registry of the project."""

from __future__ import annotations

import ast
import importlib

import pytest
from test_imports import project_modules

from variants.errors import DuplicateNameError, MemadaptError, UnknownNameError
from variants.registry import Registry

NOT_YET: set[str] = set()


def test_register_get_and_list():
    reg: Registry[int] = Registry("widget")
    assert reg.register("b", 2) == 2

    @reg.register("a")
    def a():
        return 1

    assert reg.get("a") is a and reg.get("b") == 2
    assert reg.names() == ["a", "b"] == list(reg)
    assert "a" in reg and "c" not in reg and len(reg) == 2
    assert reg.find("c", 7) == 7
    assert reg.unregister("b") == 2 and reg.names() == ["a"]


def test_duplicates_are_refused_unless_replaced():
    reg: Registry[object] = Registry("widget")
    first, second = object(), object()
    reg.register("x", first)
    reg.register("x", first)  # the same entry again: a re-import, harmless
    with pytest.raises(DuplicateNameError, match=r"widget .x. is already registered .*replace"):
        reg.register("x", second)
    assert reg.get("x") is first
    reg.register("x", second, replace=True)
    assert reg.get("x") is second
    assert issubclass(DuplicateNameError, MemadaptError) and issubclass(DuplicateNameError,
                                                                        ValueError)


def test_unknown_name_lists_the_known_ones():
    reg: Registry[int] = Registry("widget")
    reg.register("b", 1)
    reg.register("a", 2)
    with pytest.raises(UnknownNameError, match="unknown widget 'z'; known: a, b"):
        reg.get("z")

    class MyError(Exception):
        pass

    mine: Registry[int] = Registry("gadget", error=MyError)
    mine.register("q", 1)
    with pytest.raises(MyError, match="unknown gadget 'z'; known: q"):
        mine.get("z")
    with pytest.raises(ValueError, match="non-empty string"):
        reg.register("", 3)


def _registries() -> list[tuple[str, str, Registry]]:
    import variants  # noqa: F401  (registers the built-in entries)

    out = []
    for mod_name, path in sorted(project_modules().items()):
        if mod_name == "cli" or "Registry(" not in path.read_text():
            continue
        mod = importlib.import_module(mod_name)
        for attr, value in vars(mod).items():
            if isinstance(value, Registry) and getattr(value, "_owner", None) is None:
                value._owner = (mod_name, attr)
                out.append((mod_name, attr, value))
    return out


REGISTRIES = _registries()


def test_the_extension_points_are_registries():
    names = {f"{m}.{a}" for m, a, _ in REGISTRIES}
    for expected in ("variants.families._base._FAMILIES", "variants.specs._SPEC_TYPES",
                     "variants.transforms._TORCH", "variants.transforms._ONNX",
                     "variants.backends._BACKENDS", "variants.exits._ADAPTERS",
                     "variants.prune._PRUNERS", "variants.data._SOURCES",
                     "variants.families.custom._FACTORIES", "variants.recover._DEFAULTS",
                     "adaptive.budget._SOURCES", "adaptive.traces._KINDS",
                     "adaptive.policy_base._POLICIES"):
        assert expected in names


@pytest.mark.parametrize("registry", [r for _, _, r in REGISTRIES],
                         ids=[f"{m}.{a}" for m, a, _ in REGISTRIES])
def test_every_registry_follows_the_rules(registry):
    names = registry.names()
    assert names == sorted(names)
    with pytest.raises(Exception, match=f"unknown {registry.what} 'no-such-name'; known: ") as e:
        registry.get("no-such-name")
    assert all(n in str(e.value) for n in names)
    if names:
        with pytest.raises(DuplicateNameError):
            registry.register(names[0], object())


def _hand_rolled(mod_name: str, path) -> list[str]:
    """``register*`` functions that store into a module-level dict themselves."""
    tree = ast.parse(path.read_text())
    tables = {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
              for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
              if isinstance(t, ast.Name) and isinstance(node.value, ast.Dict)}
    out = []
    for fn in ast.walk(tree):
        if isinstance(fn, ast.FunctionDef) and fn.name.startswith("register"):
            for node in ast.walk(fn):
                if isinstance(node, ast.Assign) and any(
                        isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name)
                        and t.value.id in tables for t in node.targets):
                    out.append(f"{mod_name}.{fn.name} (line {node.lineno})")
    return out


def test_no_hand_rolled_registry():
    found = [f for m, p in project_modules().items() if m not in NOT_YET
             for f in _hand_rolled(m, p)]
    assert not found, f"use variants.registry.Registry instead: {found}"


@pytest.mark.parametrize("raw,default,want", [
    ("1", False, True), ("On", False, True), (" yes ", False, True), ("TRUE", False, True),
    ("0", True, False), ("off", True, False), ("", True, True), (None, False, False),
])
def test_env_flag_reads_on_off_values(monkeypatch, raw, default, want):
    from variants.backends import env_flag

    if raw is None:
        monkeypatch.delenv("MEMADAPT_TEST_FLAG", raising=False)
    else:
        monkeypatch.setenv("MEMADAPT_TEST_FLAG", raw)
    assert env_flag("MEMADAPT_TEST_FLAG", default) is want


def test_env_flag_warns_on_a_typo_and_keeps_the_default(monkeypatch):
    from variants.backends import env_flag

    monkeypatch.setenv("MEMADAPT_TEST_FLAG", "ture")
    with pytest.warns(RuntimeWarning, match=r"MEMADAPT_TEST_FLAG='ture' is not an on/off"):
        assert env_flag("MEMADAPT_TEST_FLAG", False) is False
