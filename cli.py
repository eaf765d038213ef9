"""memadapt's command line: translates flags into calls of the public APIs, nothing else.

Exit codes: 0 ok; 1 a runtime failure (one clear line, ``--debug`` for the
traceback); 2 bad input (unknown names, out-of-range values), with what is
allowed.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

log = logging.getLogger("memadapt")


# ---------------------------------------------------------------- helpers

def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def _errors(fn: Callable) -> Callable:
    """Map the project's errors to click's: bad input -> exit 2, failures -> exit 1."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        from adaptive.errors import AdaptiveError, InfeasibleBudget
        from variants.errors import DataError, MemadaptError, SpecError, UnknownNameError

        ctx = click.get_current_context()
        debug = (ctx.find_root().obj or {}).get("debug", False)
        try:
            return fn(*args, **kwargs)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except (SpecError, UnknownNameError, DataError) as e:
            if debug:
                raise
            raise click.UsageError(str(e), ctx=ctx) from None
        except InfeasibleBudget as e:
            if debug:
                raise
            raise click.ClickException(str(e)) from None
        except (MemadaptError, AdaptiveError, ValueError) as e:
            if debug:
                raise
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            raise click.ClickException("interrupted; what finished is stored, re-run to resume") \
                from None
        except Exception as e:  # noqa: BLE001 - last line of defence: one line, no traceback
            if debug:
                raise
            raise click.ClickException(f"{type(e).__name__}: {e} (re-run with --debug for the "
                                       f"traceback)") from None

    return wrapper


def _csv(kind: Callable[[str], Any], what: str, allowed: str):
    """A click callback parsing comma-separated values, with a clear error."""

    def cb(ctx, param, value):
        if value is None or value == "":
            return ()
        out = []
        for part in str(value).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                out.append(kind(part))
            except (ValueError, TypeError):
                raise click.BadParameter(f"{part!r} is not {what}; allowed: {allowed}") from None
        return tuple(out)

    return cb


def _quant_mode(s: str) -> str:
    from variants.specs import QUANT_MODES

    if s not in QUANT_MODES:
        raise ValueError(s)
    return s


def _ratio(s: str) -> float:
    r = float(s)
    if not 0.0 < r < 1.0:
        raise ValueError(s)
    return r


def _exit_point(s: str) -> int:
    k = int(s)
    if k < 1:
        raise ValueError(s)
    return k


def _fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


class _Progress:
    """A rich progress bar fed by the library's ``progress(desc, done, total)`` callbacks."""

    def __init__(self, enabled: bool = True):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.enabled = enabled and sys.stderr.isatty()
        self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TimeElapsedColumn(), transient=True, disable=not self.enabled)
        self._tasks: dict[str, int] = {}

    def __enter__(self):
        self._p.__enter__()
        return self

    def __exit__(self, *exc):
        return self._p.__exit__(*exc)

    def __call__(self, desc: str, done: int, total: int) -> None:
        top = ":" not in desc
        key = "top" if top else "step"
        if key not in self._tasks:
            self._tasks[key] = self._p.add_task(desc, total=total)
        self._p.update(self._tasks[key], description=desc, completed=done, total=total)
        if not self.enabled:
            log.info("%s (%d/%d)", desc, done, total)


# ---------------------------------------------------------------- the group

@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option("-v", "--verbose", is_flag=True, help="Log what the library does.")
@click.version_option(package_name="memadapt", message="memadapt %(version)s")
@click.pass_context
def main(ctx: click.Context, debug: bool, verbose: bool) -> None:
    """memadapt: memory-adaptive model execution caching.

    A server that hosts many DNN models caches their *execution* in limited
    memory. Unlike a CDN object, a model can shrink: memadapt generates
    variants (pruned, int8/fp16, early-exit), profiles them on your device,
    and keeps one variant per model resident under a memory budget, never
    below each model's accuracy floor.

    \b
    Typical flow:
      memadapt models                                   # built-in model names
      memadapt generate resnet18 --quantize int8 --out store
      memadapt list store
      memadapt profile store --batch 1,8
      memadapt show store --plot pareto.png
      memadapt select store --budget 512MiB --floor resnet18=0.9
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "root"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


@main.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.argument("pattern", default="*")
@_errors
def models_cmd(as_json: bool, pattern: str) -> None:
    """List the built-in model names (optionally matching a glob PATTERN)."""
    from variants import list_models

    ms = list_models(pattern)
    if as_json:
        click.echo(json.dumps([m.__dict__ for m in ms], indent=2))
        return
    from rich.table import Table

    t = Table(title="built-in models")
    for col in ("name", "family", "task", "params", "description", "weights"):
        t.add_column(col, justify="right" if col == "params" else "left",
                     no_wrap=col == "name")
    for m in ms:
        t.add_row(m.name, m.family, m.task, f"{m.params / 1e6:.1f} M", m.description, m.source)
    _console().print(t)


@main.command("generate")
@click.argument("model")
@click.option("--out", "-o", "store", required=True, type=click.Path(file_okay=False),
              help="Store folder (created if missing).")
@click.option("--quantize", callback=_csv(_quant_mode, "a quantization mode", "int8, fp16"),
              help="Comma-separated: int8 (CPU), fp16 (GPU).")
@click.option("--prune", callback=_csv(_ratio, "a ratio", "numbers in (0, 1), e.g. 0.3,0.5"),
              help="Comma-separated pruning ratios in (0, 1), e.g. 0.3,0.5.")
@click.option("--exit", "exits", callback=_csv(_exit_point, "an exit point", "integers >= 1"),
              help="Comma-separated early-exit points, e.g. 1,2,3.")
@click.option("--combine", is_flag=True,
              help="Generate every combination (prune -> exit -> quantize), not each alone.")
@click.option("--calib", default=None, metavar="NAME|PATH",
              help="Calibration/distillation data: random, digits, text, or a .npz/.txt/folder "
                   "(default: digits for ResNets, text for BERT).")
@click.option("--num-classes", type=click.IntRange(min=1), default=None,
              help="Classifier outputs (default 1000 for ResNets; BERT: a classification head).")
@click.option("--weights", type=click.Path(exists=True), default=None,
              help="Local weights: a .safetensors/.pt state dict (ResNet) or a from_pretrained "
                   "folder (BERT).")
@click.option("--pretrained", is_flag=True,
              help="torchvision's pretrained weights (needs network access).")
@click.option("--recover-steps", type=click.IntRange(min=0), default=None,
              help="Distillation steps to recover pruned/early-exit accuracy (0: none).")
@click.option("--resolution", type=click.IntRange(min=32), default=None,
              help="ResNet serving resolution used for export checks and profiling (224).")
@click.option("--name", default=None, help="Name of the base variant (default: MODEL).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@_errors
def generate_cmd(model, store, quantize, prune, exits, combine, calib, num_classes, weights,
                 pretrained, recover_steps, resolution, name, seed, as_json) -> None:
    """Generate MODEL's variants into a store (always including the base).

    Idempotent and resumable: a variant already stored with the same key is
    skipped, so re-running after an interrupt only does what is missing.

    \b
    Examples:
      memadapt generate resnet18 --quantize int8 --out store
      memadapt generate resnet18 --prune 0.5 --exit 2 --quantize int8 --combine --out store
      memadapt generate minilm --quantize int8 --out store
    """
    import variants

    fam = variants.family_of(model)
    opts: dict[str, Any] = {}
    if resolution is not None:
        if fam.name != "resnet":
            raise click.BadParameter("--resolution applies to ResNets only",
                                     param_hint="--resolution")
        opts["resolution"] = resolution
    with _Progress(not as_json) as bar:
        results = variants.generate(model, store, quantize=quantize, prune=prune, exits=exits,
                                    combine=combine, calib=calib, num_classes=num_classes,
                                    weights=weights, pretrained=pretrained, seed=seed,
                                    recover_steps=recover_steps, name=name, progress=bar, **opts)
    if as_json:
        click.echo(json.dumps([r.__dict__ for r in results], indent=2))
        return
    from rich.table import Table

    t = Table(title=f"{model} -> {store}")
    for col in ("variant", "status", "params", "onnx bytes", "seconds"):
        t.add_column(col, justify="left" if col in ("variant", "status") else "right",
                     no_wrap=col == "variant")
    for r in results:
        t.add_row(r.name, r.status, f"{r.params / 1e6:.2f} M", _fmt_bytes(r.bytes),
                  f"{r.seconds:.1f}")
    _console().print(t)


@main.command("list")
@click.argument("store", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of variants.")
@click.option("--verify", is_flag=True, help="Check every file against its sha256.")
@_errors
def list_cmd(store: str, as_json: bool, verify: bool) -> None:
    """List the variants in STORE, one row each."""
    from variants import Store

    st = Store(store)
    ms = [st.verify(n) if verify else st.get(n) for n in st.names()]
    if as_json:
        out = [{"name": m.name, "key": m.key, "base": m.base, "parent": m.parent,
                "family": m.family, "task": m.task, "specs": [s.to_dict() for s in m.specs],
                "params": m.params, "bytes": m.bytes, "onnx_path": str(m.onnx_path.resolve()),
                "weights_path": str(m.weights_path.resolve()) if m.weights_path else None,
                "metrics": m.metrics,
                "export_max_abs_diff": (m.export_check or {}).get("max_abs_diff")}
               for m in ms]
        click.echo(json.dumps(out, indent=2))
        return
    from rich.table import Table

    t = Table(title=f"{len(ms)} variants in {store}")
    for col in ("name", "family", "params", "onnx bytes", "vs base", "fidelity", "key"):
        t.add_column(col, justify="right" if col in ("params", "onnx bytes", "vs base",
                                                     "fidelity") else "left",
                     no_wrap=col in ("name", "key"))
    base_bytes = {m.name: m.bytes for m in ms if not m.specs}
    for m in ms:
        ratio = m.bytes / base_bytes[m.base] if m.base in base_bytes else None
        fid = m.metrics.get("fidelity_after", m.metrics.get("top1_agreement_to_parent",
                                                            m.metrics.get("cosine_to_parent")))
        t.add_row(m.name, m.family, f"{m.params / 1e6:.2f} M", _fmt_bytes(m.bytes),
                  f"{ratio:.0%}" if ratio else "-", f"{fid:.3f}" if fid is not None else "-",
                  m.key[:8])
    _console().print(t)


if __name__ == "__main__":  # pragma: no cover
    main()
