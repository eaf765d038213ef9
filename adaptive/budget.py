"""Budget sources: where the variant cache learns how many bytes it may hold.

A :class:`BudgetSource` is a zero-argument callable returning a byte count. The cache reads
it at construction, on :meth:`~adaptive.cache.VariantCache.refresh_budget` and from its
background thread, so a budget can follow the machine (free GPU memory, a container's memory
limit) instead of being a number someone guessed once.

Sources are registered by name (``list_budget_sources()``) and :func:`as_budget` turns what a
user writes (``8_000_000``, ``"512MiB"``, ``"cgroup"``, a function, a source) into a source.
Sources that look at the whole device (CUDA, cgroup) count the cache's own resident bytes as
available to it: :meth:`BudgetSource.attach` hands them the cache's ``resident_bytes``, so
the budget does not shrink just because the cache filled it.

No heavy imports at module level: torch and NVML are imported only by the CUDA source, when
it is read.
"""

from __future__ import annotations

import logging
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from adaptive.errors import AdaptiveError
from adaptive.units import format_size, parse_size
from variants.registry import Registry

__all__ = [
    "BudgetError", "BudgetSource", "CallableBudget", "CgroupBudget", "CudaFreeBudget",
    "FixedBudget", "as_budget", "list_budget_sources", "make_budget_source",
    "register_budget_source",
]

log = logging.getLogger(__name__)

#: Bytes kept back by default by the device-wide sources for what the cache does not account
#: (allocator slack, other libraries' workspaces).
DEFAULT_RESERVE = 64 * 1024**2
#: Default share of the available bytes a device-wide source hands to the cache.
DEFAULT_FRACTION = 0.9
# cgroup v1 reports "no limit" as a huge page-aligned number (2**63 - 4096 on x86_64).
_V1_UNLIMITED = 1 << 62


class BudgetError(AdaptiveError, ValueError):
    """A budget source cannot produce a budget, or a budget value is invalid."""


def _coerce_bytes(value: Any, what: str) -> int:
    """A non-negative whole number of bytes from an int, an integral float or a size string."""
    if isinstance(value, bool):
        raise BudgetError(f"{what}: expected a number of bytes or a size such as '512MiB', "
                          f"got {value!r}")
    if isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError as e:
            raise BudgetError(f"{what}: {e}") from None
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise BudgetError(f"{what}: a budget must be a whole number of bytes, got {value!r}")
        value = int(value)
    if not isinstance(value, int):
        raise BudgetError(f"{what}: expected a number of bytes or a size such as '512MiB', "
                          f"got {value!r}")
    if value < 0:
        raise BudgetError(f"{what}: a budget must be >= 0 bytes, got {value}")
    return value


def _check_share(reserve_bytes: int | str, fraction: float, who: str) -> tuple[int, float]:
    reserve = _coerce_bytes(reserve_bytes, f"{who} reserve_bytes")
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
        raise BudgetError(f"{who}: fraction must be in (0, 1], got {fraction!r}")
    return reserve, float(fraction)


class BudgetSource(ABC):
    """Something that says how many bytes the cache may hold right now."""

    #: registry name (set by :func:`register_budget_source`)
    name: ClassVar[str] = ""

    @abstractmethod
    def __call__(self) -> int:
        """The current budget in bytes (>= 0)."""

    def attach(self, usage: Callable[[], int]) -> None:
        """Give the source a way to read the cache's own resident bytes.

        Device-wide sources add them back to the free memory they observe: memory the cache
        holds is memory it may keep. Fixed and callable sources ignore it.
        """
        return None

    @property
    def dynamic(self) -> bool:
        """Whether the value can change without :meth:`VariantCache.set_budget` (so the
        background thread should poll it)."""
        return True


_SOURCES: Registry[type[BudgetSource]] = Registry("budget source", error=BudgetError)


def register_budget_source(name: str, *, replace: bool = False
                           ) -> Callable[[type[BudgetSource]], type[BudgetSource]]:
    """Class decorator: make a :class:`BudgetSource` available by name."""

    def deco(cls: type[BudgetSource]) -> type[BudgetSource]:
        _SOURCES.register(name, cls, replace=replace)
        cls.name = name
        return cls

    return deco


def list_budget_sources() -> list[str]:
    """Names of the registered budget sources."""
    return _SOURCES.names()


def make_budget_source(name: str, **kwargs: Any) -> BudgetSource:
    """Build the registered source ``name`` with ``kwargs``."""
    return _SOURCES.get(name)(**kwargs)


@register_budget_source("fixed")
class FixedBudget(BudgetSource):
    """A constant number of bytes (what ``set_budget(n)`` installs)."""

    def __init__(self, bytes: int | str):  # noqa: A002 - the natural name for the argument
        self.bytes = _coerce_bytes(bytes, "FixedBudget")

    def __call__(self) -> int:
        return self.bytes

    @property
    def dynamic(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"FixedBudget({self.bytes} = {format_size(self.bytes)})"


@register_budget_source("callable")
class CallableBudget(BudgetSource):
    """Whatever a function returns (bytes, or a size string); for budgets an operator or a
    control loop owns."""

    def __init__(self, fn: Callable[[], int | str]):
        if not callable(fn):
            raise BudgetError(f"CallableBudget needs a callable, got {fn!r}")
        self.fn = fn

    def __call__(self) -> int:
        name = getattr(self.fn, "__name__", self.fn)
        return _coerce_bytes(self.fn(), f"budget function {name!r}")

    def __repr__(self) -> str:
        return f"CallableBudget({self.fn!r})"


class _DeviceShare(BudgetSource):
    """Budget = ``fraction`` x (free bytes + the cache's own bytes) - ``reserve_bytes``."""

    def __init__(self, reserve_bytes: int | str, fraction: float):
        self.reserve_bytes, self.fraction = _check_share(reserve_bytes, fraction,
                                                         type(self).__name__)
        self._usage: Callable[[], int] = lambda: 0

    def attach(self, usage: Callable[[], int]) -> None:
        self._usage = usage

    def _share(self, free: int) -> int:
        available = max(0, free) + max(0, int(self._usage()))
        return max(0, int(available * self.fraction) - self.reserve_bytes)


def _nvml_free(index: int) -> tuple[int, int] | None:
    """(free, total) bytes of CUDA device ``index`` via NVML, or None without NVML.

    NVML numbers devices physically and ignores CUDA_VISIBLE_DEVICES, so the CUDA index is
    mapped through it first (integer lists and GPU UUIDs).
    """
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
        ids = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
        if ids and index < len(ids) and not ids[index].isdigit():
            handle = pynvml.nvmlDeviceGetHandleByUUID(ids[index])
        else:
            physical = int(ids[index]) if ids and index < len(ids) else index
            handle = pynvml.nvmlDeviceGetHandleByIndex(physical)
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return int(info.free), int(info.total)
    except pynvml.NVMLError as e:
        log.debug("NVML unavailable: %s", e)
        return None


def _torch_free(index: int) -> tuple[int, int] | None:
    """(free, total) via torch.cuda.mem_get_info, or None without a CUDA torch/device.

    Second choice after NVML: it creates a CUDA context on the device (hundreds of MB).
    """
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    if index >= torch.cuda.device_count():
        raise BudgetError(f"CudaFreeBudget: no CUDA device {index} (torch sees "
                          f"{torch.cuda.device_count()})")
    free, total = torch.cuda.mem_get_info(index)
    return int(free), int(total)


@register_budget_source("cuda-free")
class CudaFreeBudget(_DeviceShare):
    """Free memory of a CUDA device (NVML, else torch), plus what the cache holds.

    ``mem_info`` (device index -> (free, total) bytes) is injectable for tests and for
    other runtimes' own queries.
    """

    def __init__(self, device: int | str = 0, reserve_bytes: int | str = DEFAULT_RESERVE,
                 fraction: float = DEFAULT_FRACTION, *,
                 mem_info: Callable[[int], tuple[int, int]] | None = None):
        super().__init__(reserve_bytes, fraction)
        if isinstance(device, str):
            kind, _, idx = device.partition(":")
            if kind != "cuda" or (idx and not idx.isdigit()):
                raise BudgetError(f"CudaFreeBudget: bad device {device!r}; use an index, "
                                  f"'cuda' or 'cuda:<index>'")
            device = int(idx or 0)
        if isinstance(device, bool) or not isinstance(device, int) or device < 0:
            raise BudgetError(f"CudaFreeBudget: device must be an index >= 0, got {device!r}")
        self.device = device
        self._mem_info = mem_info

    def __call__(self) -> int:
        if self._mem_info is not None:
            info = self._mem_info(self.device)
        else:
            info = _nvml_free(self.device) or _torch_free(self.device)
        if info is None:
            raise BudgetError(
                f"CudaFreeBudget: no CUDA device {self.device} is visible (no NVML via pynvml, "
                f"and torch.cuda.is_available() is False or torch is missing); on a CPU "
                f"machine use CgroupBudget or an explicit budget such as '512MiB'")
        return self._share(int(info[0]))

    def __repr__(self) -> str:
        return (f"CudaFreeBudget(device={self.device}, reserve={format_size(self.reserve_bytes)}, "
                f"fraction={self.fraction:g})")


@register_budget_source("cgroup")
class CgroupBudget(_DeviceShare):
    """The container's memory limit minus its usage, plus what the cache holds.

    Reads cgroup v2 (``memory.max``, ``memory.current``) or v1 (``memory.limit_in_bytes``,
    ``memory.usage_in_bytes``) of this process's cgroup and its ancestors, and takes the
    tightest limited level, since a limit set on a parent binds the child too. ``path`` (a
    cgroup folder) skips discovery, e.g. for tests; ``root`` is where the hierarchy is mounted.
    """

    def __init__(self, reserve_bytes: int | str = DEFAULT_RESERVE,
                 fraction: float = DEFAULT_FRACTION, *, path: str | os.PathLike | None = None,
                 root: str | os.PathLike = "/sys/fs/cgroup",
                 proc_cgroup: str | os.PathLike = "/proc/self/cgroup"):
        super().__init__(reserve_bytes, fraction)
        self.path = Path(path) if path is not None else None
        self.root = Path(root)
        self.proc_cgroup = Path(proc_cgroup)

    def __call__(self) -> int:
        free = self.free_bytes()
        return self._share(free)

    def free_bytes(self) -> int:
        """Bytes left under the tightest cgroup memory limit (limit - usage)."""
        levels = [self.path] if self.path is not None else self._levels()
        best: int | None = None
        for d in levels:
            got = _read_level(d)
            if got is not None:
                limit, usage = got
                free = limit - usage
                best = free if best is None else min(best, free)
        if best is None:
            where = ", ".join(str(d) for d in levels) or f"none found under {self.root}"
            raise BudgetError(f"CgroupBudget: no cgroup memory limit is set for this process "
                              f"(looked in {where}: unlimited or absent); pass an explicit "
                              f"budget such as '4GiB' or run under a memory limit")
        return best

    def _levels(self) -> list[Path]:
        """This process's cgroup folder and its ancestors, v2 first, then v1."""
        try:
            lines = self.proc_cgroup.read_text().splitlines()
        except OSError:
            return []
        out: list[Path] = []
        for line in lines:
            parts = line.split(":", 2)
            if len(parts) != 3:
                continue
            hid, controllers, rel = parts
            if hid == "0" and controllers == "":
                base = self.root if (self.root / "cgroup.controllers").exists() \
                    else self.root / "unified"
            elif "memory" in controllers.split(","):
                base = self.root / "memory"
            else:
                continue
            d = base / rel.lstrip("/")
            while True:
                if d.is_dir():
                    out.append(d)
                if d == base or base not in d.parents:
                    break
                d = d.parent
        return out

    def __repr__(self) -> str:
        where = self.path if self.path is not None else "auto"
        return (f"CgroupBudget(path={where}, reserve={format_size(self.reserve_bytes)}, "
                f"fraction={self.fraction:g})")


def _read_level(d: Path) -> tuple[int, int] | None:
    """(limit, usage) of one cgroup folder, or None when it has no memory limit."""
    v2_max, v2_cur = d / "memory.max", d / "memory.current"
    v1_max, v1_cur = d / "memory.limit_in_bytes", d / "memory.usage_in_bytes"
    try:
        if v2_max.is_file() and v2_cur.is_file():
            raw = v2_max.read_text().strip()
            if raw == "max":
                return None
            return int(raw), int(v2_cur.read_text().strip())
        if v1_max.is_file() and v1_cur.is_file():
            limit = int(v1_max.read_text().strip())
            if limit >= _V1_UNLIMITED:
                return None
            return limit, int(v1_cur.read_text().strip())
    except (OSError, ValueError) as e:
        log.debug("cannot read cgroup memory files in %s: %s", d, e)
    return None


def as_budget(x: BudgetSource | int | float | str | Callable[[], int | str]) -> BudgetSource:
    """A :class:`BudgetSource` from what a user wrote.

    ``BudgetSource`` -> itself; an int (or integral float) -> :class:`FixedBudget`; a string
    naming a registered source (``"cgroup"``, ``"cuda-free"``) -> that source with its
    defaults, any other string -> a size (``"512MiB"``, see :func:`adaptive.parse_size`);
    a callable -> :class:`CallableBudget`.
    """
    if isinstance(x, BudgetSource):
        return x
    if isinstance(x, str) and x.strip() in _SOURCES and x.strip() not in ("fixed", "callable"):
        return make_budget_source(x.strip())
    if isinstance(x, (int, float, str)) and not isinstance(x, bool):
        return FixedBudget(_coerce_bytes(x, "budget"))
    if callable(x):
        return CallableBudget(x)
    raise BudgetError(f"cannot make a budget from {x!r}: pass bytes (int), a size such as "
                      f"'512MiB', a source name ({', '.join(list_budget_sources())}), a "
                      f"function returning bytes, or a BudgetSource")
