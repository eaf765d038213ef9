"""ONNX export with a numerical check against torch.

One self-contained ``.onnx`` file per variant (no external data), dynamic
batch (and sequence) axes. After export the file is run in onnxruntime on
fresh random inputs and compared with torch; the max abs difference is
recorded, and an export that disagrees beyond the tolerance is refused.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from variants.errors import ExportError

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-3  # relative to the output's magnitude
# (min, max) of each named dynamic axis
_DIM_RANGES = {"batch": (1, 4096), "seq": (2, 512), "height": (32, 2048), "width": (32, 2048)}


@dataclass(frozen=True)
class ExportCheck:
    max_abs_diff: float
    tolerance: float
    batches: tuple[int, ...]
    passed: bool

    def to_dict(self) -> dict:
        return asdict(self)


def export_onnx(module, family, arch: dict[str, Any], path: str | Path, *,
                tolerance: float = DEFAULT_TOLERANCE, check_batches: tuple[int, ...] = (1, 3),
                seed: int = 0) -> ExportCheck:
    """Export ``module`` to ``path`` and check it against torch; raise ExportError on mismatch."""
    import torch

    path = Path(path)
    specs = family.inputs(arch)
    names = [s.name for s in specs]
    example = family.example_inputs(arch, 2, seed=seed, seq_len=16)
    dims: dict[str, Any] = {}
    dynamic_shapes = []
    for s in specs:
        axes = {}
        for i, d in enumerate(s.shape):
            if isinstance(d, str):
                if d not in dims:
                    lo, hi = _DIM_RANGES.get(d, (2, 512))
                    dims[d] = torch.export.Dim(d, min=lo, max=hi)
                axes[i] = dims[d]
        dynamic_shapes.append(axes)
    module = module.eval()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, example, str(path), dynamo=True, external_data=False,
                              input_names=names, output_names=family.output_names(arch),
                              dynamic_shapes=tuple(dynamic_shapes), verbose=False,
                              optimize=True)
    except Exception as e:  # noqa: BLE001 - exporter errors are many and deep
        raise ExportError(f"ONNX export of {arch.get('model')!r} failed: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return check_onnx(module, family, arch, path, tolerance=tolerance,
                      batches=check_batches, seed=seed + 1)


def check_onnx(module, family, arch, path, *, tolerance=DEFAULT_TOLERANCE, batches=(1, 3),
               seed=1) -> ExportCheck:
    """Run ``path`` in onnxruntime and torch on the same fresh inputs; compare outputs."""
    import numpy as np
    import torch

    from variants.backends import open_onnx

    sess = open_onnx(path, device="cpu")
    worst, scale = 0.0, 0.0
    for i, b in enumerate(batches):
        inputs = family.example_inputs(arch, b, seed=seed + i, seq_len=9 + 4 * i)
        with torch.no_grad():
            ref = module(*inputs).float().numpy()
        got = sess.run([t.numpy() for t in inputs])
        if got.shape != ref.shape:
            raise ExportError(f"exported graph returns shape {got.shape}, torch {ref.shape} "
                              f"(batch {b})")
        worst = max(worst, float(np.abs(got - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
    tol = tolerance * max(1.0, scale)
    check = ExportCheck(worst, tol, tuple(batches), worst <= tol)
    if not check.passed:
        raise ExportError(f"exported ONNX disagrees with torch: max abs diff {worst:.3g} > "
                          f"tolerance {tol:.3g}; the graph uses an op the exporter mistranslates")
    log.debug("export check %s: max abs diff %.3g", path, worst)
    return check
