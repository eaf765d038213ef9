"""Safe weight files: safetensors everywhere, ``torch.load(weights_only=True)`` as a fallback."""

from __future__ import annotations

from pathlib import Path

from variants.errors import DataError


def load_state_dict_file(path: str | Path) -> dict:
    """Load a state dict without unpickling arbitrary objects."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"weights file {str(p)!r} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    import torch

    try:
        sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise DataError(f"cannot read weights from {str(p)!r}: {e}; save a state_dict with "
                        f"safetensors or torch.save(model.state_dict())") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise DataError(f"{str(p)!r} does not hold a state dict")
    return sd


def save_state_dict(module, path: str | Path) -> None:
    """Write a module's tensors as safetensors (shared tensors are cloned)."""
    from safetensors.torch import save_file

    sd = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    save_file(sd, str(path))
