"""Shared tensors: a content-hashed pool (torch modules and onnxruntime sessions) and in-place
exit moves.

Multi-model hosting (DESIGN.md): several torch modules in one process hold every
identical tensor once. :class:`TensorPool` keys each tensor by its content (dtype,
shape and a SHA-256 of its bytes) and counts the modules using it, so two task models
on one frozen backbone, or a model and its early-exit variants, cost one backbone::

    pool = TensorPool()
    a, ha = pool.load("bert", arch_a, "a/weights.safetensors")   # streams, dedups
    b, hb = pool.add(other_module)                                # dedups in place
    pool.bytes()                                                  # unique bytes held
    pool.transition_cost([ha], b_tensors)                         # bytes freed / needed
    pool.release(ha)                                              # frees what only a used

onnxruntime sessions take their tensors from the same kind of pool as numpy arrays
(:meth:`TensorPool.take_arrays`, keyed by the content of the *optimised* graph's tensors,
:mod:`variants.ort_forms`); the backend hands them to each session with
``SessionOptions.add_initializer``, which computes on them without a copy.

Memory-adaptive models: an exit@k variant is a prefix of the full model plus a small
head (its backbone is frozen, so the prefix tensors are the full model's).
:func:`downgrade_in_place` turns a resident full model into its exit@k variant from
the full model's own layers and a head already in memory: nothing is loaded, the tail
is dropped. :func:`upgrade_in_place` goes back, reading only the tail's tensors from
the full variant's safetensors file (``safetensors.safe_open``, key by key).

Importing this module does not import torch.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from variants.errors import StoreError
from variants.exits import EXIT_KEY, exit_adapter
from variants.tensors import (
    TensorKey,
    empty_parameters,
    meta_names,
    module_tensors,
    set_tensor,
    tensor_bytes,
    tensor_index,
    tensor_key,
)

__all__ = [
    "PoolHandle", "SharingGroups", "TensorKey", "TensorPool", "Transition", "downgrade_in_place",
    "empty_parameters", "exit_head_keys", "load_exit_head", "module_tensors", "sharing_groups",
    "tensor_bytes", "tensor_index", "tensor_key", "upgrade_in_place",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SharingGroups:
    """How a set of stored variants share tensors (see :func:`sharing_groups`).

    ``groups`` maps a group name to its bytes, ``users`` a group to the variants using it,
    ``needs`` a variant to the groups it uses and ``private`` a variant to the bytes of the
    tensors no other listed variant holds.
    """

    groups: dict[str, int]
    users: dict[str, frozenset[str]]
    needs: dict[str, frozenset[str]]
    private: dict[str, int]

    def shared_bytes(self, variant: str) -> int:
        """Bytes of the groups ``variant`` uses."""
        return sum(self.groups[g] for g in self.needs[variant])

    def standalone_bytes(self, variant: str) -> int:
        """Bytes of every distinct tensor of ``variant``."""
        return self.private[variant] + self.shared_bytes(variant)


def sharing_groups(indices: Mapping[str, Mapping[str, TensorKey]]) -> SharingGroups:
    """Group the tensors of several variants (``variant -> tensor_index``) by the exact set
    of variants holding them: each set of two or more is a group (held once, whoever of its
    users is resident), a tensor only one variant holds is that variant's private bytes.

    Task models on one frozen backbone get a group for the backbone; a model's full and
    exit@k variants a group for the prefix. Group names are ``shared-<digest>`` of the
    users, stable across runs.
    """
    holders: dict[TensorKey, set[str]] = {}
    for variant, index in indices.items():
        for key in set(index.values()):
            holders.setdefault(key, set()).add(variant)
    groups: dict[str, int] = {}
    users: dict[str, frozenset[str]] = {}
    needs: dict[str, set[str]] = {v: set() for v in indices}
    private = dict.fromkeys(indices, 0)
    by_users: dict[frozenset[str], int] = {}
    for key, who in holders.items():
        if len(who) == 1:
            private[next(iter(who))] += key.nbytes
        else:
            fs = frozenset(who)
            by_users[fs] = by_users.get(fs, 0) + key.nbytes
    for fs, nbytes in sorted(by_users.items(), key=lambda kv: sorted(kv[0])):
        name = "shared-" + hashlib.sha256("\n".join(sorted(fs)).encode()).hexdigest()[:10]
        groups[name] = nbytes
        users[name] = fs
        for v in fs:
            needs[v].add(name)
    return SharingGroups(groups, users, {v: frozenset(g) for v, g in needs.items()}, private)


def _skeleton(family, arch: dict):
    """``family.rebuild(arch)`` with meta parameters."""
    from variants.families import get_family

    fam = get_family(family) if isinstance(family, str) else family
    with empty_parameters():
        return fam.rebuild(arch)


# ---- the pool --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Transition:
    """What replacing some modules by others costs in the pool."""

    freed_bytes: int
    needed_bytes: int


@dataclass(eq=False)
class PoolHandle:
    """One module registered in a :class:`TensorPool`: the content keys it uses."""

    name: str
    keys: frozenset[TensorKey]
    released: bool = field(default=False)
    #: bytes read from the weights file when it was loaded (the rest was already pooled)
    read_bytes: int = 0

    @property
    def bytes(self) -> int:
        """Bytes of the distinct tensors this module uses (shared ones included)."""
        return sum(k.nbytes for k in self.keys)


class _Entry:
    __slots__ = ("tensor", "refs")

    def __init__(self, tensor):
        self.tensor = tensor
        self.refs = 0


class TensorPool:
    """Content-addressed tensors shared by the modules loaded or added through it.

    Each distinct tensor is held once, with a count of the modules using it;
    :meth:`release` drops what no other module uses. The pool owns one lock; a module's
    slots are rewired under it, so do not run a module while it is being added.
    """

    def __init__(self, device: str = "cpu"):
        self.device = device
        self._entries: dict[TensorKey, _Entry] = {}
        self._lock = threading.Lock()
        self._count = 0

    # -- registering modules ---------------------------------------------------------------

    def add(self, module, name: str | None = None) -> tuple[Any, PoolHandle]:
        """Rewire ``module``'s parameters and buffers to pooled tensors (in place): each
        tensor whose content is already pooled is replaced by the pooled one (its own copy
        becomes garbage), the others join the pool. Returns ``(module, handle)``."""
        tensors = module_tensors(module)
        keyed = {n: tensor_key(t) for n, t in tensors.items() if t.device.type != "meta"}
        if len(keyed) != len(tensors):
            raise ValueError(f"module has meta tensors {meta_names(module)[:5]}; load their "
                             f"values first (TensorPool.load builds and fills a skeleton)")
        taken: set[TensorKey] = set()
        with self._lock:
            for n, key in keyed.items():
                set_tensor(module, n, self._take(key, tensors[n], taken))
            return module.to(self.device), self._register(name, taken)

    def load(self, family, arch: dict, weights: str | Path, name: str | None = None, *,
             index: Mapping[str, TensorKey] | None = None) -> tuple[Any, PoolHandle]:
        """Build ``family``'s module for ``arch`` with empty parameters and fill it from a
        safetensors file one tensor at a time through the pool. With ``index`` (the file's
        :func:`tensor_index`) a tensor the pool already holds is not even read: loading a
        variant whose backbone is resident reads only its own tensors. Without it, a held
        tensor costs a transient read and a hash. Returns ``(module, handle)``."""
        from safetensors import safe_open

        module = _skeleton(family, arch)
        slots = module_tensors(module)
        taken: set[TensorKey] = set()
        filled: set[str] = set()
        read = 0
        try:
            with safe_open(str(weights), framework="pt") as f:
                for n in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    if n not in slots:
                        raise StoreError(f"{weights}: tensor {n!r} has no slot in the rebuilt "
                                         f"{arch.get('model')!r}; the file does not match its "
                                         f"arch")
                    key = index.get(n) if index is not None else None
                    if key is not None:
                        with self._lock:
                            t = self._take_held(key, taken)
                        if t is not None:
                            set_tensor(module, n, t)
                            filled.add(n)
                            continue
                    t = f.get_tensor(n)
                    read += tensor_bytes(t)
                    if key is None:
                        key = tensor_key(t)
                    with self._lock:  # own copy: a kept view would pin the whole file mapping
                        set_tensor(module, n, self._take(key, t, taken, copy=True))
                    filled.add(n)
            missing = meta_names(module)
            if missing:
                raise StoreError(f"{weights} lacks {len(missing)} tensors of "
                                 f"{arch.get('model')!r}, e.g. {missing[:3]}")
            rest = {n: t for n, t in module_tensors(module).items() if n not in filled}
            rest_keys = {n: tensor_key(t) for n, t in rest.items()}
            with self._lock:  # tensors not in the file (non-persistent buffers) join too
                for n, t in rest.items():
                    set_tensor(module, n, self._take(rest_keys[n], t, taken))
                handle = self._register(name, taken)
                handle.read_bytes = read
        except BaseException:
            with self._lock:
                self._drop(taken)
            raise
        return module.eval(), handle

    def take_arrays(self, index: Mapping[str, TensorKey],
                    read: Callable[[list[str]], Mapping[str, Any]], name: str | None = None
                    ) -> tuple[dict[str, Any], PoolHandle]:
        """Arrays by tensor name for an onnxruntime session (``index``: name -> content key of
        its optimised graph's tensors): those the pool holds are taken from it, the others are
        fetched with ``read(names)`` (from a host form or the file) and join the pool. The
        session computes on the pooled arrays in place (``add_initializer``), so sessions
        holding identical tensors hold them once. Returns ``(arrays, handle)``."""
        taken: set[TensorKey] = set()
        out: dict[str, Any] = {}
        with self._lock:
            for n, key in index.items():
                a = self._take_held(key, taken)
                if a is not None:
                    out[n] = a
        todo = [n for n in index if n not in out]
        try:
            got = read(todo) if todo else {}
            read_bytes = sum(int(got[n].nbytes) for n in todo)
            with self._lock:
                for n in todo:
                    out[n] = self._take_array(index[n], got[n], taken)
                handle = self._register(name, taken)
                handle.read_bytes = read_bytes
        except BaseException:
            with self._lock:
                self._drop(taken)
            raise
        return out, handle

    def held(self, keys: Iterable[TensorKey]) -> frozenset[TensorKey]:
        """The ones of ``keys`` the pool holds now."""
        with self._lock:
            return frozenset(k for k in keys if k in self._entries)

    def release(self, handle: PoolHandle) -> int:
        """Forget a module; returns the bytes of the tensors no other module uses (freed
        once the caller drops the module too). Releasing twice is a ValueError."""
        with self._lock:
            if handle.released:
                raise ValueError(f"pool handle {handle.name!r} was already released")
            handle.released = True
            return self._drop(handle.keys)

    # -- accounting ------------------------------------------------------------------------

    def bytes(self) -> int:
        """Bytes of the distinct tensors the pool holds."""
        with self._lock:
            return sum(k.nbytes for k in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def refs(self, key: TensorKey) -> int:
        e = self._entries.get(key)
        return 0 if e is None else e.refs

    def transition_cost(self, release: Iterable[Any], acquire: Any) -> Transition:
        """Bytes freed by releasing the modules in ``release`` (handles) and bytes to load
        for ``acquire`` (a handle, a module, a name -> tensor mapping or content keys):
        freed counts the tensors only the released modules use and ``acquire`` does not
        need; needed counts what ``acquire`` needs that the pool does not hold."""
        rel = list(release)
        want = _keys_of(acquire)
        with self._lock:
            dropping: dict[TensorKey, int] = {}
            for h in rel:
                for k in h.keys:
                    dropping[k] = dropping.get(k, 0) + 1
            freed = sum(k.nbytes for k, n in dropping.items()
                        if k in self._entries and self._entries[k].refs == n and k not in want)
            needed = sum(k.nbytes for k in want if k not in self._entries)
        return Transition(freed, needed)

    # -- internals (under the lock) --------------------------------------------------------

    # A module's references are counted as its tensors are taken, not when it is
    # registered, so a release on another thread cannot drop a tensor a load is using.

    def _take(self, key: TensorKey, tensor, taken: set[TensorKey], copy: bool = False):
        """The pooled tensor for ``key`` (``tensor`` joins the pool if none), counted once
        per module (``taken``)."""
        e = self._entries.get(key)
        if e is None:
            t = tensor.detach()
            if str(t.device) != self.device:
                t = t.to(self.device)
            elif copy:
                t = t.clone()
            e = self._entries[key] = _Entry(t)
        if key not in taken:
            e.refs += 1
            taken.add(key)
        return e.tensor

    def _take_array(self, key: TensorKey, array, taken: set[TensorKey]):
        """Like :meth:`_take` for a numpy array (kept as is: it is already the pool's own)."""
        e = self._entries.get(key)
        if e is None:
            e = self._entries[key] = _Entry(array)
        if key not in taken:
            e.refs += 1
            taken.add(key)
        return e.tensor

    def _take_held(self, key: TensorKey, taken: set[TensorKey]):
        """The pooled tensor for ``key`` if the pool holds it (counted), else None."""
        e = self._entries.get(key)
        if e is None:
            return None
        if key not in taken:
            e.refs += 1
            taken.add(key)
        return e.tensor

    def _drop(self, keys: Iterable[TensorKey]) -> int:
        freed = 0
        for key in keys:
            e = self._entries[key]
            e.refs -= 1
            if e.refs == 0:
                del self._entries[key]
                freed += key.nbytes
        return freed

    def _register(self, name: str | None, taken: Iterable[TensorKey]) -> PoolHandle:
        self._count += 1
        return PoolHandle(name or f"module{self._count}", frozenset(taken))


def _keys_of(x: Any) -> frozenset[TensorKey]:
    if isinstance(x, PoolHandle):
        return x.keys
    if hasattr(x, "named_parameters"):
        return frozenset(tensor_key(t) for t in module_tensors(x).values())
    if isinstance(x, Mapping):
        return frozenset(tensor_key(t) for t in x.values())
    keys = frozenset(x)
    if not all(isinstance(k, TensorKey) for k in keys):
        raise TypeError("acquire must be a PoolHandle, an nn.Module, a name -> tensor mapping "
                        "or TensorKeys")
    return keys


# ---- in-place downgrade / upgrade between a full model and its exit@k variant -----------------

def _family(family):
    from variants.families import get_family

    return get_family(family) if isinstance(family, str) else family


def exit_head_keys(family, exit_arch: dict) -> frozenset[str]:
    """Names of the exit@k variant's head tensors: everything in it that is *not* the
    full model's prefix (for a BERT classifier that includes its fine-tuned pooler and
    classifier, whose names the full model also has)."""
    fam = _family(family)
    return exit_adapter(fam.name).head_keys(_skeleton(fam, exit_arch))


def load_exit_head(family, exit_arch: dict, exit_weights: str | Path) -> dict[str, Any]:
    """Read only the head tensors of a stored exit@k variant (a few linears: the part of
    the variant a resident full model does not already hold)."""
    from safetensors import safe_open

    keys = exit_head_keys(family, exit_arch)
    with safe_open(str(exit_weights), framework="pt") as f:
        missing = keys - set(f.keys())
        if missing:
            raise StoreError(f"{exit_weights} lacks the exit head tensors {sorted(missing)[:3]}")
        return {k: f.get_tensor(k) for k in sorted(keys)}


def _modules(module) -> list[Any]:
    """Every submodule once: ``nn.Module.modules()`` without its name bookkeeping (about
    3x faster; the in-place downgrade's budget is a millisecond)."""
    seen, stack, out = set(), [module], []
    while stack:
        m = stack.pop()
        if id(m) in seen:
            continue
        seen.add(id(m))
        out.append(m)
        stack.extend(c for c in m._modules.values() if c is not None)
    return out


def _slots(module) -> list[tuple[Any, str, Any, bool]]:
    """(owner module, leaf name, tensor, is parameter) for every slot holding a tensor:
    one traversal, reused to find and to empty the slots."""
    out = []
    for m in _modules(module):
        out += [(m, k, t, True) for k, t in m._parameters.items() if t is not None]
        out += [(m, k, t, False) for k, t in m._buffers.items() if t is not None]
    return out


def downgrade_in_place(full, family, exit_arch: dict, head: Mapping[str, Any]
                       ) -> tuple[Any, int]:
    """Turn a resident full model into its exit@k variant without loading anything.

    The exit module is built from ``full``'s own submodules (its prefix tensors are the
    very same objects) plus ``head`` (the head tensors, from :func:`load_exit_head`, kept
    in memory while the model is resident). ``full`` is consumed: its tail slots are
    emptied (None), so the tail tensors are freed even if the caller still holds ``full``.
    Returns ``(exit module in eval mode, bytes freed)``.
    """
    fam = _family(family)
    adapter = exit_adapter(fam.name)
    at = int(exit_arch[EXIT_KEY]["at"])
    before = _slots(full)
    adapter.cut_prefix(full, at)
    with empty_parameters():  # the head's fresh parameters cost nothing: head fills them
        exit_mod = adapter.rebuild(full, exit_arch)
    for name, t in head.items():
        set_tensor(exit_mod, name, t)
    after = _slots(exit_mod)
    missing = [k for _, k, t, _ in after if t.device.type == "meta"]
    if missing:
        raise ValueError(f"exit@{at}: no value for {missing[:3]}; pass the exit variant's "
                         f"head tensors (load_exit_head)")
    kept = {id(t) for _, _, t, _ in after}
    kept_ptrs = {t.data_ptr() for _, _, t, _ in after}
    freed: dict[int, int] = {}
    for owner, leaf, t, is_param in before:
        if id(t) in kept:
            continue
        if t.data_ptr() not in kept_ptrs:
            freed[t.data_ptr()] = tensor_bytes(t)
        slots = owner._parameters if is_param else owner._buffers
        if slots.get(leaf) is t:  # (else it now holds a head tensor: a classifier's pooler)
            slots[leaf] = None  # allowed in both dicts, and 10x cheaper than a meta tensor
    for m in _modules(exit_mod):  # new wrapper modules start in training mode
        m.training = False
    return exit_mod, sum(freed.values())


def upgrade_in_place(exit_mod, family, full_arch: dict, full_weights: str | Path,
                     head_keys: Iterable[str]) -> tuple[Any, list[str]]:
    """Turn a resident exit@k module back into the full model, loading only the tail.

    The full structure is built with empty parameters; every prefix tensor is taken from
    ``exit_mod`` (shared, not copied) and only the remaining keys are read from the full
    variant's safetensors file with ``safe_open``. ``head_keys`` are the exit head's
    names (:func:`exit_head_keys`), never reused. Returns ``(full module, keys read)``.
    """
    from safetensors import safe_open

    skel = _skeleton(family, full_arch)
    slots = module_tensors(skel)
    have = module_tensors(exit_mod)
    head = frozenset(head_keys)
    reused = set()
    for name, t in have.items():
        if name in head or name not in slots or tuple(slots[name].shape) != tuple(t.shape):
            continue
        set_tensor(skel, name, t)
        reused.add(name)
    with safe_open(str(full_weights), framework="pt") as f:
        # every stored tensor not reused: parameters and persistent buffers (BatchNorm
        # statistics) alike, since the skeleton's buffers hold init values, not the model's
        read = sorted(set(f.keys()) - reused)
        for name in read:
            set_tensor(skel, name, f.get_tensor(name))
    missing = meta_names(skel)
    if missing:
        raise StoreError(f"{full_weights} lacks {missing[:3]}; is it the full variant of "
                         f"this exit module?")
    return skel.eval(), read
