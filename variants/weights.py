"""Safe weight files: safetensors everywhere, ``torch.load(weights_only=True)`` as a fallback."""

from __future__ import annotations

from pathlib import Path

from variants.errors import DataError


def load_state_dict_file(path: str | Path) -> dict:
    """Load a state dict without unpickling arbitrary objects."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"weights file {str(p)!r} does not exist")
    import torch

    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as e:  # noqa: BLE001 - SafetensorError and friends: a bad file
            raise DataError(f"{str(p)!r} is not a safetensors file ({_why(e)}); {_SAVE}") \
                from None
    try:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise DataError(f"cannot read weights from {str(p)!r} ({_why(e)}); {_SAVE}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise DataError(f"{str(p)!r} holds a {type(sd).__name__}, not a state dict (a mapping "
                        f"of tensor names to tensors); {_SAVE}")
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise DataError(f"{str(p)!r} is not a state dict: {len(bad)} entries are not "
                        f"name -> tensor, e.g. {bad[:3]!r}; {_SAVE}")
    return sd


_SAVE = "save one with torch.save(model.state_dict(), path) or safetensors' save_file"


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def load_weights_into(module, path: str | Path, *, model: str) -> None:
    """Load a state dict file into ``module`` (built as ``model``); a file for another model
    or class count is a DataError that names what does not match and what to do."""
    sd = load_state_dict_file(path)
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} (the model's: {tuple(own[k].shape)})"
              for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of the model's tensors are missing (e.g. "
                         f"{', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} are not the model's (e.g. "
                         f"{', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} have another shape: {'; '.join(shapes[:2])}")
        hint = " (pass --num-classes to match its classifier)" if shapes and not missing \
            and not unexpected else ""
        raise DataError(f"{str(path)!r} does not hold {model!r} weights: {'; '.join(parts)}; "
                        f"use weights saved from {model!r}{hint}")
    module.load_state_dict(sd)


def save_state_dict(module, path: str | Path) -> None:
    """Write a module's tensors as safetensors (shared tensors are cloned)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    save_file(sd, str(path))
