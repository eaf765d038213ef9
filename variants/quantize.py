"""Quantization of exported graphs with onnxruntime.

- ``int8`` on CNNs: static QDQ, per-channel weights, calibrated activations
  (dynamic int8 turns convolutions into ConvInteger, 3.8x *slower* on CPU).
- ``int8`` on transformers: dynamic, per-channel (cosine to fp32 0.994 vs 0.97
  per-tensor on MiniLM).
- ``fp16``: weights and compute in half precision, fp32 inputs/outputs kept,
  meant for GPUs (the CUDA EP has no int8 kernels).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path

from variants.specs import Quantize
from variants.transforms import TransformContext, register_onnx_transform

log = logging.getLogger(__name__)


class _Reader:
    """onnxruntime CalibrationDataReader over our calibration batches."""

    def __init__(self, names: list[str], batches):
        self._it = iter([{n: t.numpy() for n, t in zip(names, b)} for b in batches])

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # pragma: no cover - called by some calibrators
        pass


def _quiet():
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    for name in ("root", "onnxruntime"):
        lg = logging.getLogger(name)
        old = lg.level
        lg.setLevel(logging.ERROR)
        stack.callback(lg.setLevel, old)
    return stack


def quantize_int8(src: Path, dst: Path, *, static: bool, input_names: list[str] | None = None,
                  calib=None) -> None:
    from onnxruntime.quantization import (
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp, _quiet():
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        if static:
            quantize_static(str(pre), str(dst), _Reader(input_names or [], calib),
                            quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)
        else:
            quantize_dynamic(str(pre), str(dst), per_channel=True, weight_type=QuantType.QInt8)


def convert_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet():
        model = onnx.load(str(src))
        model16 = convert_float_to_float16(model, keep_io_types=True)
        onnx.save(model16, str(dst))


@register_onnx_transform(Quantize)
def _quantize(src: Path, dst: Path, spec: Quantize, arch: dict, ctx: TransformContext) -> None:
    if spec.mode == "fp16":
        convert_fp16(src, dst)
        return
    # Static QDQ for convolutional families, dynamic for transformers (see module docstring).
    static = ctx.family.task == "classification" and ctx.family.name != "bert"
    names = [s.name for s in ctx.family.inputs(arch)]
    quantize_int8(src, dst, static=static, input_names=names, calib=list(ctx.calib))
    ctx.report["int8_method"] = "static-qdq-per-channel" if static else "dynamic-per-channel"
