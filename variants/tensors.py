"""Tensors by content: keys, the index of a safetensors file, and module slots.

The layer under :mod:`variants.backends` (a pooled load reads a file's
:func:`tensor_index`), :mod:`variants.shared` (the :class:`~variants.shared.TensorPool`
keys tensors by :func:`tensor_key`) and the exit adapters (which build skeletons with
:func:`empty_parameters`). Importing this module does not import torch.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from variants.errors import StoreError

__all__ = ["TensorKey", "empty_parameters", "meta_names", "module_tensors", "set_tensor",
           "tensor_bytes", "tensor_index", "tensor_key"]


# ---- content keys ----------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorKey:
    """What makes two tensors interchangeable: dtype, shape and the hash of their bytes."""

    dtype: str
    shape: tuple[int, ...]
    digest: str
    nbytes: int


def tensor_key(t) -> TensorKey:
    """The content key of a tensor (its bytes are hashed on the CPU)."""
    import torch

    data = t.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    data = data.contiguous()
    h = hashlib.sha256()
    h.update(f"{data.dtype}|{tuple(data.shape)}|".encode())
    if data.numel():
        h.update(memoryview(data.reshape(-1).view(torch.uint8).numpy()))
    return TensorKey(str(data.dtype), tuple(data.shape), h.hexdigest(),
                     data.numel() * data.element_size())


def tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


# safetensors dtype codes -> torch's names, as tensor_key writes them
_ST_DTYPES = {"F64": "torch.float64", "F32": "torch.float32", "F16": "torch.float16",
              "BF16": "torch.bfloat16", "I64": "torch.int64", "I32": "torch.int32",
              "I16": "torch.int16", "I8": "torch.int8", "U8": "torch.uint8", "BOOL": "torch.bool"}


def tensor_index(weights: str | Path) -> dict[str, TensorKey]:
    """The content key of every tensor in a safetensors file, by name, without torch.

    Reads the header and hashes each tensor's byte range; the keys equal
    :func:`tensor_key` of the loaded tensors, so a :class:`TensorPool` can tell which
    tensors of a file it already holds before reading any. Cached per (path, size, mtime).
    """
    p = Path(weights)
    try:
        st = p.stat()
    except OSError as e:
        raise StoreError(f"cannot read tensor index of {p}: {e}") from None
    return dict(_tensor_index(str(p), st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=256)
def _tensor_index(path: str, size: int, mtime_ns: int) -> tuple[tuple[str, TensorKey], ...]:
    import json
    import mmap
    import struct

    out = []
    with open(path, "rb") as f:
        try:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header of {n} bytes in a {size}-byte file")
            header = json.loads(f.read(n))
        except (struct.error, ValueError) as e:
            raise StoreError(f"{path} is not a safetensors file ({e}); regenerate the "
                             f"variant") from None
        header.pop("__metadata__", None)
        if not header:
            return ()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for name, meta in sorted(header.items()):
                dtype = _ST_DTYPES.get(meta["dtype"])
                if dtype is None:
                    raise StoreError(f"{path}: tensor {name!r} has dtype {meta['dtype']} that "
                                     f"memadapt does not share; known: {sorted(_ST_DTYPES)}")
                a, b = meta["data_offsets"]
                shape = tuple(int(x) for x in meta["shape"])
                h = hashlib.sha256(f"{dtype}|{shape}|".encode())
                if b > a:
                    h.update(memoryview(mm)[8 + n + a:8 + n + b])
                out.append((name, TensorKey(dtype, shape, h.hexdigest(), b - a)))
    return tuple(out)


# ---- module slots -------------------------------------------------------------------------

def module_tensors(module) -> dict[str, Any]:
    """Every parameter and buffer of ``module`` by dotted name (tied ones under each name,
    non-persistent buffers included)."""
    out = dict(module.named_parameters(remove_duplicate=False))
    out.update(module.named_buffers(remove_duplicate=False))
    return out


def set_tensor(module, name: str, tensor) -> None:
    """Put ``tensor`` in the parameter or buffer slot ``name`` (a Parameter sharing its
    storage for a parameter slot; no copy)."""
    from torch import nn

    owner, _, leaf = name.rpartition(".")
    sub = module.get_submodule(owner) if owner else module
    if leaf in sub._parameters:
        if not isinstance(tensor, nn.Parameter):
            tensor = nn.Parameter(tensor, requires_grad=False)
        sub._parameters[leaf] = tensor
    elif leaf in sub._buffers:
        sub._buffers[leaf] = tensor.data if isinstance(tensor, nn.Parameter) else tensor
    else:
        raise KeyError(f"{name!r} is neither a parameter nor a buffer of {type(sub).__name__}")


_PATCH_LOCK = threading.Lock()


@contextlib.contextmanager
def empty_parameters() -> Iterator[None]:
    """Build modules whose *parameters* are on the meta device (no memory, no init cost);
    buffers stay real, because non-persistent ones (BERT's ``position_ids``) are not in
    any weights file. Patches ``nn.Module.register_parameter`` for the duration: the
    same trick as ``accelerate.init_empty_weights(include_buffers=False)``."""
    from torch import nn

    with _PATCH_LOCK:
        original = nn.Module.register_parameter

        def register(self, name, param):
            original(self, name, param)
            if param is not None and param.device.type != "meta":
                kind = type(self._parameters[name])
                self._parameters[name] = kind(param.to("meta"), requires_grad=param.requires_grad)

        nn.Module.register_parameter = register
        try:
            yield
        finally:
            nn.Module.register_parameter = original


def meta_names(module) -> list[str]:
    return [n for n, t in module_tensors(module).items() if t.device.type == "meta"]
