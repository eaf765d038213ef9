"""The host tier: what a re-load needs, kept in host memory so it skips the disk.

A cachetools-shaped mapping (``maxsize``, ``currsize``, ``getsizeof``; least recently used
out first) from variant name to the backend's host form (:func:`variants.backends.host_form`,
ONNX bytes for onnxruntime). It decides nothing about the budget by itself: the cache bounds
it with ``maxsize`` when the user gives the tier its own ``host_budget``, and otherwise
charges every entry to the same byte ledger as the sessions (on CPU the tier lives in the
same RAM), dropping entries first whenever a load needs their memory.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

__all__ = ["HostTier"]


class HostTier(MutableMapping[str, Any]):
    """An LRU mapping bounded by the total ``getsizeof`` of its values (``maxsize`` bytes;
    ``math.inf``: bounded only by what the caller evicts). A value larger than ``maxsize`` is
    not kept (``tier[k] = v`` is then a no-op, as a cache may decline to hold something).
    ``on_evict(key, value)`` is called for every entry dropped to make room or popped."""

    def __init__(self, maxsize: float = math.inf, getsizeof: Callable[[Any], int] = len,
                 on_evict: Callable[[str, Any], None] | None = None):
        if not maxsize >= 0:
            raise ValueError(f"HostTier maxsize must be >= 0 bytes, got {maxsize!r}")
        self.maxsize = maxsize
        self._getsizeof = getsizeof
        self._on_evict = on_evict
        self._data: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self.currsize = 0

    def getsizeof(self, value: Any) -> int:
        return int(self._getsizeof(value))

    def __getitem__(self, key: str) -> Any:
        value, _ = self._data[key]
        self._data.move_to_end(key)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        size = self.getsizeof(value)
        if size > self.maxsize:
            return
        if key in self._data:
            self.pop(key)
        while self._data and self.currsize + size > self.maxsize:
            self.popitem()
        self._data[key] = (value, size)
        self.currsize += size

    def __delitem__(self, key: str) -> None:
        _, size = self._data.pop(key)
        self.currsize -= size

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def pop(self, key: str, *default: Any) -> Any:
        if key not in self._data:
            if default:
                return default[0]
            raise KeyError(key)
        value, size = self._data.pop(key)
        self.currsize -= size
        if self._on_evict is not None:
            self._on_evict(key, value)
        return value

    def popitem(self) -> tuple[str, Any]:
        """Drop the least recently used entry."""
        if not self._data:
            raise KeyError("popitem(): the host tier is empty")
        key = next(iter(self._data))
        return key, self.pop(key)

    def clear(self) -> None:
        while self._data:
            self.popitem()

    def __repr__(self) -> str:
        return f"HostTier({len(self)} entries, {self.currsize}/{self.maxsize} bytes)"
