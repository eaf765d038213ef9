"""One registry for every extension point: a name -> entry table with one set of rules.

Families, spec kinds, transforms, exit adapters, pruners, backends, data sources,
budget sources, trace kinds and policies are each a :class:`Registry`::

    BACKENDS = Registry("backend")

    @BACKENDS.register("onnxruntime")
    def _ort(manifest, ...): ...

    BACKENDS.register("mine", factory)          # or directly
    BACKENDS.get("onnxruntime")                 # unknown name: the error lists the known ones
    BACKENDS.names()                            # sorted: what a list_* function returns

The rules: a name is registered once (registering another entry under it raises
:class:`~variants.errors.DuplicateNameError` unless ``replace=True``; registering the
same entry again is a no-op, so re-importing a module is harmless), and an unknown
name raises an error that names it and lists the known names. Importing this module
imports nothing heavy (``adaptive`` uses it too).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar, overload

from variants.errors import DuplicateNameError, UnknownNameError

__all__ = ["Registry"]

T = TypeVar("T")
_NOTHING: Any = object()


class Registry(Generic[T]):
    """Entries by name. ``what`` names the kind of entry in errors ("backend"); ``error``,
    when given, is the exception type (called with the message) raised for an unknown
    name instead of :class:`~variants.errors.UnknownNameError` (a package whose callers
    catch its own base error passes it)."""

    def __init__(self, what: str, *, error: Callable[[str], Exception] | None = None):
        self.what = what
        self._error = error
        self._entries: dict[str, T] = {}

    @overload
    def register(self, name: str, *, replace: bool = False) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, entry: T, *, replace: bool = False) -> T: ...

    def register(self, name, entry=_NOTHING, *, replace=False):
        """Register ``entry`` under ``name`` and return it; without ``entry``, a decorator
        that registers what it decorates."""
        if entry is _NOTHING:
            return lambda e: self.register(name, e, replace=replace)
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.what} name must be a non-empty string, got {name!r}")
        old = self._entries.get(name, _NOTHING)
        if old is not _NOTHING and old is not entry and not replace:
            raise DuplicateNameError(
                f"{self.what} {name!r} is already registered ({_describe(old)}); choose another "
                f"name or pass replace=True to replace it")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> T:
        """Remove and return the entry registered under ``name``."""
        self.get(name)
        return self._entries.pop(name)

    def get(self, name: str) -> T:
        """The entry registered under ``name``; an unknown name lists the known ones."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            if self._error is None:
                raise UnknownNameError(self.what, name, self.names()) from None
            raise self._error(f"unknown {self.what} {name!r}; known: "
                              f"{', '.join(self.names())}") from None

    def find(self, name: str, default: Any = None) -> T | Any:
        """The entry under ``name``, or ``default`` (for callers that have a fallback)."""
        return self._entries.get(name, default)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """``(name, entry)`` pairs, sorted by name."""
        return sorted(self._entries.items(), key=lambda kv: kv[0])

    def values(self) -> list[T]:
        return [e for _, e in self.items()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self.names())})"


def _describe(entry: Any) -> str:
    target = entry if isinstance(entry, type) or callable(entry) and \
        hasattr(entry, "__qualname__") else type(entry)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', target)}"
