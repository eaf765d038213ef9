"""memadapt's command line: translates flags into calls of the public APIs, nothing else.

Exit codes: 0 ok; 1 a runtime failure (one clear line, ``--debug`` for the
traceback); 2 bad input (unknown names, out-of-range values), with what is
allowed.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

log = logging.getLogger("memadapt")


# ---------------------------------------------------------------- helpers

def _console():
    from rich.console import Console

    # piped output (CI logs, files) gets wide tables instead of rich's 80-column default
    return Console(highlight=False, width=None if sys.stdout.isatty() else 140)


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
    from adaptive.units import format_size

    return "-" if n is None else format_size(int(n))


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
@click.option("--heads", default=None, metavar="SET[,SET...]",
              help="Instead of MODEL itself, task models on MODEL as a frozen backbone, one "
                   "per label set: built-in topic, module, or a .tsv of text<TAB>label lines "
                   "(BERT family). Each becomes MODEL-SET with the variants asked for; all "
                   "share the backbone's tensors.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--lock-timeout", type=click.FloatRange(min=0), default=3600, show_default=True,
              metavar="SECONDS",
              help="How long to wait for another run writing the same store (0: fail at once).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@_errors
def generate_cmd(model, store, quantize, prune, exits, combine, calib, num_classes, weights,
                 pretrained, recover_steps, resolution, name, heads, seed, lock_timeout,
                 as_json) -> None:
    """Generate MODEL's variants into a store (always including the base).

    Idempotent and resumable: a variant already stored with the same key is
    skipped, so re-running after an interrupt only does what is missing.

    \b
    Examples:
      memadapt generate resnet18 --quantize int8 --out store
      memadapt generate resnet18 --prune 0.5 --exit 2 --quantize int8 --combine --out store
      memadapt generate minilm --quantize int8 --out store
      memadapt generate minilm --heads topic,module --exit 3 --out store

    With --heads, the task models' backbone tensors are identical, so a server
    embedding VariantCache(..., backend="torch", share_weights=True) holds the
    backbone once for all of them.

    Runs into one store take turns: a run waits (up to --lock-timeout) for
    another one writing the store, saying which pid it waits for.
    """
    import variants

    fam = variants.family_of(model)
    if heads is not None:
        _generate_heads(model, fam, store, heads, quantize, prune, exits, combine, calib,
                        num_classes, weights, pretrained, recover_steps, resolution, name,
                        seed, as_json, lock_timeout)
        return
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
                                    recover_steps=recover_steps, name=name, progress=bar,
                                    lock_timeout=lock_timeout, **opts)
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


def _generate_heads(model, fam, store, heads, quantize, prune, exits, combine, calib,
                    num_classes, weights, pretrained, recover_steps, resolution, name, seed,
                    as_json, lock_timeout) -> None:
    from variants import Store
    from variants.heads import check_head_options, generate_heads, parse_label_sets

    check_head_options(model, {"--num-classes": num_classes, "--weights": weights,
                               "--name": name, "--calib": calib, "--resolution": resolution,
                               "--pretrained": pretrained})
    sets = parse_label_sets(heads)
    st = Store(store, create=True)
    with _Progress(not as_json) as bar, st.lock(f"generate {model} --heads {heads}",
                                                timeout=lock_timeout):
        out = generate_heads(model, sets, st, exits=exits, quantize=quantize, prune=prune,
                             combine=combine, seed=seed, recover_steps=recover_steps,
                             progress=bar)
    if as_json:
        click.echo(json.dumps([{
            "model": results[0].name, "label_set": head.name, "classes": list(head.classes),
            "train_accuracy": head.train_accuracy, "heldout_accuracy": head.heldout_accuracy,
            "samples": head.samples, "reused": head.reused,
            "variants": [r.__dict__ for r in results]} for head, results in out], indent=2))
        return
    from rich.table import Table

    t = Table(title=f"task heads on {model} -> {store}")
    for col in ("model", "classes", "texts", "held-out acc", "variants"):
        t.add_column(col, justify="left" if col in ("model", "variants") else "right")
    for head, results in out:
        t.add_row(results[0].name, str(len(head.classes)), str(head.samples),
                  f"{head.heldout_accuracy:.3f}",
                  ", ".join(f"{r.name} ({r.status})" for r in results))
    _console().print(t)


@main.command("train")
@click.argument("model")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="Where to write the trained weights (.safetensors).")
@click.option("--data", default="digits", show_default=True, metavar="NAME|PATH",
              help="Labelled data: digits (built in) or a .npz with x/y, or an image folder.")
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3,
              show_default=True)
@click.option("--num-classes", type=click.IntRange(min=2), default=10, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@_errors
def train_cmd(model, out, data, epochs, lr, num_classes, seed) -> None:
    """Briefly train MODEL (a ResNet) on labelled data, for a real accuracy number.

    No pretrained weights can be downloaded everywhere; a few epochs on the
    built-in digits (at 32x32) take about 10 s each for ResNet-18 on 2 cores.
    Feed the result to generate:

    \b
      memadapt train resnet18 --epochs 3 --out r18-digits.safetensors
      memadapt generate resnet18 --num-classes 10 --weights r18-digits.safetensors --out store
    """
    import torch

    import variants
    from variants.train import train

    fam = variants.family_of(model)
    if fam.name != "resnet":
        raise click.BadParameter(f"training is built in for ResNets; {model!r} is "
                                 f"{fam.name}", param_hint="MODEL")
    torch.manual_seed(seed)
    built = fam.build(model, num_classes=num_classes)
    with _Progress() as bar:
        res = train(built.module, fam, built.arch, source=data, epochs=epochs, lr=lr, seed=seed,
                    out=out, progress=bar)
    click.echo(f"{model}: {epochs} epochs on {data}: train accuracy {res.train_accuracy:.3f}, "
               f"held-out accuracy {res.eval_accuracy:.3f}; weights written to {out}")


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
    groups = st.groups()
    member_of = {m.name: [g.name for g in groups if m.name in g.members] for m in ms}
    if as_json:
        out = [{"name": m.name, "key": m.key, "base": m.base, "parent": m.parent,
                "groups": member_of[m.name],
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
    if groups:
        _console().print(_groups_table(groups))


def _groups_table(groups):
    from rich.table import Table

    t = Table(title=f"{len(groups)} groups (served models over several bases)")
    for col in ("group", "task", "members"):
        t.add_column(col, no_wrap=col == "group")
    for g in groups:
        t.add_row(g.name, g.task, ", ".join(g.members))
    return t


@main.command("group")
@click.argument("name")
@click.argument("members", nargs=-1, required=True)
@click.option("--out", "store", required=True, type=click.Path(), metavar="STORE",
              help="The store that holds the members; the group is stored there.")
@click.option("--replace", is_flag=True, help="Redefine an existing group of that name.")
@click.option("--json", "as_json", is_flag=True, help="Print the group as JSON.")
@_errors
def group_cmd(name, members, store, replace, as_json) -> None:
    """Serve several stored variants, of different base models, as one model NAME.

    select, simulate, replay and the cache treat NAME as one model whose
    candidates are exactly the MEMBERS listed (derived variants included, e.g.
    resnet34+int8; a member's other variants are not added), and serve each
    member only under NAME. Its floor applies to every member's accuracy, so
    members must answer one task with the same inputs and classes and be
    evaluated on the same data (exit 2 otherwise); fidelity is measured against
    the group's most accurate member by `memadapt profile`.

    \b
    Example:
      memadapt group digits resnet10 resnet10+int8 resnet18 resnet18+int8 --out store
      memadapt select store --budget 60MiB --floor digits=0.9
    """
    import profiler
    from variants import Store
    from variants.groups import GroupError, add_group

    st = Store(store)
    try:
        data = profiler.check_group_data(st, members)
        g = add_group(st, name, members, replace=replace)
    except GroupError as e:
        raise click.UsageError(str(e)) from None
    if as_json:
        click.echo(json.dumps({**g.to_dict(), "eval_set": data}, indent=2))
        return
    click.echo(f"group {g.name!r} ({g.task}) in {store}: {', '.join(g.members)}"
               + (f"; evaluated on {data}" if data else "; profile the store to measure it"))


# ---------------------------------------------------------------- profiling

@main.command("profile")
@click.argument("store", type=click.Path())
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:<i>.")
@click.option("--backend", type=click.Choice(["onnxruntime", "torch"]), default="onnxruntime",
              show_default=True)
@click.option("--batch", "batches", default="1,8", show_default=True,
              callback=_csv(int, "a batch size", "positive integers, e.g. 1,8,32"),
              help="Comma-separated batch sizes.")
@click.option("--runs", type=click.IntRange(min=1), default=20, show_default=True,
              help="Timed runs per batch size (after warm-up).")
@click.option("--warmup", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--eval", "eval_set", default="auto", show_default=True, metavar="NAME|PATH",
              help="Accuracy/fidelity data: auto (digits for 10-class ResNets, text for BERT, "
                   "random otherwise), digits, text, random, none, or a .npz/folder.")
@click.option("--variants", "pattern", default="*", show_default=True, metavar="GLOB",
              help="Only variants whose name matches.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Intra-op threads (default: all cores).")
@click.option("--force", is_flag=True, help="Measure again what is already in the catalog.")
@click.option("--lock-timeout", type=click.FloatRange(min=0), default=3600, show_default=True,
              help="Seconds to wait for another profile run of the same store to finish "
                   "(runs take turns, so neither times the other's work as its own).")
@click.option("--json", "as_json", is_flag=True, help="Print the measurements as JSON.")
@_errors
def profile_cmd(store, device, backend, batches, runs, warmup, eval_set, pattern, threads,
                force, lock_timeout, as_json) -> None:
    """Measure every variant in STORE on a device: peak memory per batch size,
    latency percentiles, load time, accuracy and fidelity to the base.

    Each (variant, batch) runs in a fresh child process, so variants cannot
    pollute each other's memory. Results go to STORE/catalog.sqlite as they
    complete: an interrupted run keeps them and a re-run does only the rest.
    A variant that fails or runs out of memory is recorded and profiling goes on.
    Two profile runs of one store take turns (see --lock-timeout); a generate
    into the same store does not wait for one.

    \b
    Example:
      memadapt profile store --batch 1,8,32 --runs 50
    """
    import profiler

    if any(b < 1 for b in batches):
        raise click.BadParameter("batch sizes must be >= 1", param_hint="--batch")
    with _Progress(not as_json) as bar:
        res = profiler.profile(store, device=device, backend=backend, batches=batches or (1, 8),
                               runs=runs, warmup=warmup,
                               eval=None if eval_set == "none" else eval_set,
                               variants=pattern, threads=threads, force=force, progress=bar,
                               lock_timeout=lock_timeout)
    if as_json:
        click.echo(json.dumps([r.__dict__ for r in res], indent=2, default=str))
        return
    from collections import Counter

    counts = Counter(r.status for r in res)
    failed = [r for r in res if r.status in ("error", "oom")]
    click.echo(f"profiled {len({r.variant for r in res})} variants on {device}/{backend}: "
               + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    for r in failed:
        click.echo(f"  {r.variant} batch {r.batch}: {r.status}: {r.error}", err=True)
    _show(store, device, backend, None)


def _show(store, device, backend, plot, batch=None):
    import profiler
    from profiler import report

    profiles = profiler.load_profiles(store, device=device, backend=backend)
    if not profiles:
        raise click.ClickException(f"no profiles for {device}/{backend} in {store}; run "
                                   f"`memadapt profile {store} --device {device}` first")
    _console().print(report.table(profiles, title=f"{store} on {device}/{backend} "
                                                  f"(★ Pareto-optimal)"))
    groups = _group_profiles(store, device, backend, profiles)
    if groups:
        _console().print(report.group_table(groups, batch, title="groups (served models over "
                                                                 "several bases)"))
    if plot:
        report.plot(profiles, plot, batch=batch)
        click.echo(f"plot written to {plot}")
    return profiles


def _group_profiles(store, device, backend, profiles):
    """The store's groups for show; a group whose members were evaluated on different data
    is reported on stderr (select and simulate refuse it) instead of hiding the catalog."""
    import profiler
    from variants.groups import GroupError

    try:
        return profiler.load_group_profiles(store, device=device, backend=backend,
                                            profiles=profiles)
    except GroupError as e:
        click.echo(f"warning: {e}", err=True)
        return []


@main.command("show")
@click.argument("store", type=click.Path())
@click.option("--device", default="cpu", show_default=True)
@click.option("--backend", type=click.Choice(["onnxruntime", "torch"]), default="onnxruntime",
              show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One object per variant and batch size.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="PNG of memory vs accuracy and latency vs accuracy, Pareto front drawn.")
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="Batch size the plot uses (default: the smallest profiled).")
@_errors
def show_cmd(store, device, backend, as_json, plot, batch) -> None:
    """Show the catalog: per variant and batch size, memory, p50/p95 latency, load time,
    accuracy and fidelity, with Pareto-optimal rows marked."""
    if as_json:
        import profiler
        from profiler import report
        from variants import Store

        profiles = profiler.load_profiles(Store(store), device=device, backend=backend)
        if plot:
            report.plot(profiles, plot, batch=batch)
        rows = report.rows(profiles)
        groups = report.group_rows(_group_profiles(store, device, backend, profiles))
        for r in rows:
            r["groups"] = {g["group"]: g["fidelity_to_reference"] for g in groups
                           if g["member"] == r["name"]}
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    from variants import Store

    _show(Store(store), device, backend, plot, batch)


# ---------------------------------------------------------------- selection and simulation

def _size(ctx, param, value):
    from adaptive.units import parse_size

    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _assignments(what: str):
    """Parse repeated ``MODEL=VALUE`` (or a bare VALUE for every model) options."""

    def cb(ctx, param, values):
        out: dict[str, float] = {}
        for v in values or ():
            model, sep, num = v.rpartition("=")
            try:
                x = float(num)
            except ValueError:
                raise click.BadParameter(f"{v!r}: expected MODEL={what.upper()} or "
                                         f"{what.upper()} (a number)") from None
            out[model if sep else "*"] = x
        return out

    return cb


def _load_demands(store, profiles, device, backend, batch, floors, slos=None):
    """The models' demands from a profiles file or a store's catalog, with ``--floor`` and
    ``--slo`` applied (``*``: every model); a value out of range or a model that is not there
    is a usage error naming it (exit 2)."""
    from dataclasses import replace

    from adaptive.catalog import demands_from_catalog, demands_from_json

    floors, slos = dict(floors), dict(slos or {})
    for model, x in floors.items():
        if not 0.0 <= x <= 1.0:
            raise click.BadParameter(f"{'every model' if model == '*' else model}: floor {x:g} "
                                     f"is outside [0, 1] (accuracy or fidelity)",
                                     param_hint="--floor")
    for model, x in slos.items():
        if not x > 0:
            raise click.BadParameter(f"{'every model' if model == '*' else model}: SLO {x:g} "
                                     f"must be > 0 seconds", param_hint="--slo")
    if profiles:
        ds = demands_from_json(profiles)
    else:
        from variants import Store

        ds = demands_from_catalog(Store(store), device=device, backend=backend, batch=batch)
    known = {d.model for d in ds}
    for hint, given in (("--floor", floors), ("--slo", slos)):
        unknown = sorted(set(given) - known - {"*"})
        if unknown:
            raise click.BadParameter(f"no profiles for {unknown}; known: {sorted(known)}",
                                     param_hint=hint)
    f_all, s_all = floors.get("*"), slos.get("*")
    return [replace(d, floor=floors.get(d.model, d.floor if f_all is None else f_all),
                    slo_s=slos.get(d.model, d.slo_s if s_all is None else s_all))
            for d in ds]


def _read_trace(path):
    """A request trace; a malformed one is a usage error naming the file and line (exit 2)."""
    from adaptive.traces import TraceError, read_requests

    try:
        return read_requests(path)
    except TraceError as e:
        raise click.BadParameter(str(e), param_hint="--trace") from None


def _slo_option(fn):
    return click.option("--slo", "slos", multiple=True, callback=_assignments("seconds"),
                        metavar="MODEL=SECONDS",
                        help="Latency SLO of a model (repeat), or SECONDS for all: variants "
                             "slower than it are not chosen when some variant meets it, and a "
                             "request is on time when it finishes within it.")(fn)


@main.command("select")
@click.argument("store", type=click.Path(), required=False)
@click.option("--budget", required=True, callback=_size, metavar="SIZE",
              help="Memory budget: bytes or a size such as 512MiB, 2GB (B/KiB/MiB/GiB/KB/MB/GB).")
@click.option("--floor", "floors", multiple=True, callback=_assignments("acc"),
              metavar="MODEL=ACC", help="Accuracy floor of a model (repeat), or ACC for all.")
@click.option("--rate", "rates", multiple=True, callback=_assignments("rate"),
              metavar="MODEL=R", help="Request rate of a model (repeat; default 1).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--backend", default="onnxruntime", show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Charge each variant its profiled memory at this batch size.")
@click.option("--objective", type=click.Choice(["accuracy", "misses"]), default="accuracy",
              show_default=True, help="accuracy: max sum(rate*accuracy); misses: serve the most "
                                      "requests from memory first, then accuracy.")
@click.option("--profiles", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Use a profiles JSON file instead of STORE's catalog.")
@click.option("--share", is_flag=True,
              help="Plan for one process holding identical tensors once (task models on one "
                   "backbone, a model and its exit variants): each shared group is charged "
                   "once. Reads the variants' weights from STORE; torch backend.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@_slo_option
@_errors
def select_cmd(store, budget, floors, rates, device, backend, batch, objective, profiles,
               share, as_json, slos) -> None:
    """Choose at most one resident variant per model under a memory budget.

    Never exceeds the budget and never picks a variant under its model's floor
    (floors compare with labelled accuracy when profiled, else fidelity to the
    base model). Exits 1 when a floor cannot be met within the budget.

    \b
    Examples:
      memadapt select store --budget 512MiB --floor resnet18=0.9 --rate minilm=5
      memadapt select store --backend torch --share --budget 200MiB
    """
    from dataclasses import replace

    from adaptive import select
    from adaptive.select import check_feasible

    if not store and not profiles:
        raise click.UsageError("give a STORE (profiled with `memadapt profile`) or --profiles")
    if share and not store:
        raise click.UsageError("--share reads the variants' weights: give the STORE too")
    if share and backend != "torch":
        raise click.BadParameter("only torch sessions can share tensors (onnxruntime sessions "
                                 "each hold their own); use --backend torch, with profiles from "
                                 "`memadapt profile STORE --backend torch`", param_hint="--share")
    demands = _load_demands(store, profiles, device, backend, batch, floors, slos)
    rates = dict(rates)
    default_rate = rates.pop("*", None)
    unknown = sorted(set(rates) - {d.model for d in demands})
    if unknown:
        raise click.BadParameter(f"no profiles for {unknown}", param_hint="--rate")
    demands = [replace(d, rate=rates.get(d.model, d.rate if default_rate is None
                                         else default_rate)) for d in demands]
    # every model must be servable on its own: a floor no variant meets within the
    # budget is the operator's error, not a plan that silently drops the model
    check_feasible(demands, budget, [d.model for d in demands])
    groups: dict[str, int] = {}
    if share:
        from adaptive.catalog import share_candidates
        from adaptive.sharing import plan_groups, select_shared
        from variants import Store

        shared, groups = share_candidates(Store(store), {d.model: d.candidates for d in demands})
        demands = [replace(d, candidates=shared[d.model]) for d in demands]
        plan = select_shared(demands, groups, budget, objective=objective)
        held = {g: groups[g] for g in sorted(plan_groups(plan))}
    else:
        plan = select(demands, budget, objective=objective)
        held = {}
    if as_json:
        out = {"budget_bytes": budget, "memory_bytes": plan.memory_bytes,
               "utility": plan.utility, "exact": plan.exact, "plan": plan.choice}
        if share:
            out["shared_groups"] = held
        click.echo(json.dumps(out, indent=2))
        return
    from rich.table import Table

    shared_note = f" ({_fmt_bytes(sum(held.values()))} of it shared, held once)" if share else ""
    t = Table(title=f"plan for {_fmt_bytes(budget)}: {_fmt_bytes(plan.memory_bytes)} used"
                    f"{shared_note}, utility {plan.utility:.3f}")
    mem_col = "own memory" if share else "memory"
    for col in ("model", "floor", "rate", "variant", mem_col, "accuracy"):
        t.add_column(col, justify="left" if col in ("model", "variant") else "right",
                     no_wrap=col in ("model", "variant"))
    for d in demands:
        c = plan.details.get(d.model)
        t.add_row(d.model, f"{d.floor:.3f}", f"{d.rate:g}", c.variant if c else "(not resident)",
                  _fmt_bytes(c.memory_bytes) if c else "-", f"{c.accuracy:.3f}" if c else "-")
    _console().print(t)


@main.group("trace")
def trace_group() -> None:
    """Make and inspect request traces (CSV: timestamp_s,model[,batch])."""


@trace_group.command("synth")
@click.option("--models", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--requests", type=click.IntRange(min=1), default=100_000, show_default=True)
@click.option("--kind", type=click.Choice(["zipf", "bursty", "diurnal", "azure"]), default="zipf",
              show_default=True, help="zipf popularity, bursty on/off, diurnal rate, or an "
                                      "Azure-Functions-like mix (most models idle, a few hot).")
@click.option("--duration", type=click.FloatRange(min=1), default=3600.0, show_default=True,
              help="Seconds the trace spans.")
@click.option("--prefix", default="model", show_default=True, help="Model names: PREFIX000...")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False))
@_errors
def trace_synth_cmd(models, requests, kind, duration, prefix, seed, out) -> None:
    """Write a synthetic request trace (deterministic for a seed).

    \b
    Example:
      memadapt trace synth --models 30 --requests 100000 --kind azure --seed 1 --out t.csv
    """
    from adaptive.traces import synth, write_requests

    width = max(3, len(str(models - 1)))
    names = [f"{prefix}{i:0{width}d}" for i in range(models)]
    tr = synth(kind, names, requests, seed, duration_s=duration)
    write_requests(tr, out)
    counts = sorted(tr.counts().tolist(), reverse=True) if hasattr(tr, "counts") else []
    hot = sum(counts[:max(1, models // 10)]) / max(1, len(tr)) if counts else 0
    click.echo(f"wrote {len(tr):,} requests over {models} models ({kind}, seed {seed}) to {out}; "
               f"the hottest 10% of models get {hot:.0%} of requests")


@main.command("simulate")
@click.option("--store", type=click.Path(), default=None, help="Store whose catalog gives the "
              "profiles (trace models not in it are cloned round-robin from its models).")
@click.option("--profiles", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A profiles JSON file instead of --store.")
@click.option("--trace", "trace_path", required=True, type=click.Path(exists=True,
                                                                       dir_okay=False))
@click.option("--budget", callback=_size, default=None, metavar="SIZE",
              help="Fixed memory budget, e.g. 1GiB.")
@click.option("--budget-trace", type=click.Path(exists=True, dir_okay=False), default=None,
              help="CSV timestamp_s,budget_bytes: a budget that changes over time.")
@click.option("--floor", "floors", multiple=True, callback=_assignments("acc"),
              metavar="MODEL=ACC", help="Accuracy floor of a profiled model (its clones inherit "
                                        "it), or ACC for all.")
@click.option("--policies", default="all", show_default=True,
              help="Comma-separated policy names, or all.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--backend", default="onnxruntime", show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Charge variants their profiled memory at this batch size.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one object per policy (and the "
              "bound), with every metric.")
@click.option("--plot", type=click.Path(dir_okay=False), default=None,
              help="Write a PNG: miss rate and accuracy per policy, memory over time.")
@_slo_option
@_errors
def simulate_cmd(store, profiles, trace_path, budget, budget_trace, floors, policies, device,
                 backend, batch, seed, as_json, plot, slos) -> None:
    """Replay a request trace against every caching policy, from profiles alone.

    Whole-model policies (random, lru, lfu, loadtime, cremebrulee) cache each
    model's most accurate variant; infaas loads the fastest variant meeting the
    floor; memadapt downgrades models before it evicts and upgrades into memory
    no model needs; belady (offline Belady-Size) and bound (a lower bound on
    any policy's misses) are references. A request waiting for a load is a
    miss, one waiting for a swap a stall; "on time" is within the SLO (--slo),
    or not waiting at all without one. Effective accuracy counts late requests
    as 0; normalized accuracy divides by each model's best variant.

    \b
    Example:
      memadapt trace synth --models 30 --kind zipf --out t.csv
      memadapt simulate --store store --trace t.csv --budget 1GiB --floor 0.8 --plot sim.png
    """
    from adaptive.catalog import map_population
    from adaptive.policies import list_policies
    from adaptive.simulate import compare
    from adaptive.traces import read_budget

    if (budget is None) == (budget_trace is None):
        raise click.UsageError("give exactly one of --budget and --budget-trace")
    if not store and not profiles:
        raise click.UsageError("give --store (profiled with `memadapt profile`) or --profiles")
    names = list_policies() if policies == "all" else [p.strip() for p in policies.split(",")]
    bad = sorted(set(names) - set(list_policies()))
    if bad:
        raise click.BadParameter(f"unknown policies {bad}; known: {', '.join(list_policies())}",
                                 param_hint="--policies")
    trace = _read_trace(trace_path)
    families = _load_demands(store, profiles, device, backend, batch, floors, slos)
    demands = map_population(families, list(trace.models))
    b = read_budget(budget_trace) if budget_trace else budget
    with _Progress(not as_json) as bar:
        results = {}
        for i, p in enumerate(names):
            bar(f"simulating {p}", i, len(names))
            results.update(compare(trace, demands, [p], b, seed=seed))
        results.update(compare(trace, demands, [], b, bound=True))
    if plot:
        from adaptive.report import plot_simulation

        plot_simulation(results, plot, title=f"{trace_path}: {len(trace):,} requests, "
                                             f"{len(demands)} models")
    if as_json:
        click.echo(json.dumps([r.to_dict() | {"memory_series": None} for r in results.values()],
                              indent=2))
        return
    from adaptive.report import simulation_table

    _console().print(simulation_table(
        results, title=f"{len(trace):,} requests, {len(demands)} models, budget "
                       f"{_fmt_bytes(budget) if budget is not None else budget_trace}"))
    if "memadapt" in results:
        from adaptive.verdict import verdict

        v = verdict(results)
        click.echo("memadapt beats every online policy on misses + stalls, SLO attainment and "
                   "effective accuracy" if v.holds else
                   "memadapt falls short: " + "; ".join(v.shortfalls))
        click.echo(_accuracy_split(results))
    if "bound" in results:
        click.echo(_bound_line(results))
    if plot:
        click.echo(f"plot written to {plot}")


def _accuracy_split(results: dict[str, Any]) -> str:
    """One line: what late requests and smaller variants took of memadapt's effective
    accuracy, beside infaas's and the most accurate other online policy's."""
    from adaptive.policies import competitors
    from adaptive.report import accuracy_lost

    online = competitors([p for p in results if p != "bound"])
    shown = ["memadapt"] + [p for p in ("infaas",) if p in results]
    rest = [p for p in online if p not in shown]
    if rest:
        shown.append(max(rest, key=lambda p: results[p].effective_accuracy))
    parts = [f"{p} {accuracy_lost(results[p])}" for p in shown]
    return (f"effective accuracy lost to late requests / to smaller variants, of "
            f"{results['memadapt'].best_accuracy:.4f} at best: " + ", ".join(parts))


def _bound_line(results: dict[str, Any]) -> str:
    """One line: the bound on misses, its compulsory part, and every other row's miss rate
    (online policies, ablations, belady) as a multiple of it, best first."""
    b = results["bound"]
    comp = b.policy_stats.get("compulsory_miss_rate")
    head = f"bound on misses {b.miss_rate:.4f}" + (
        f" (compulsory: first requests and those during a first load, {comp:.4f})"
        if comp is not None else "")
    if b.miss_rate <= 0:
        return head
    ratios = sorted((r.miss_rate / b.miss_rate, p) for p, r in results.items() if p != "bound")
    return head + "; misses over it: " + ", ".join(f"{p} {x:.2f}x" for x, p in ratios)


@main.command("replay")
@click.option("--store", required=True, type=click.Path(exists=True, file_okay=False),
              help="Profiled store whose variants serve the trace (trace models not in it are "
                   "backed by its models round-robin).")
@click.option("--trace", "trace_path", required=True, type=click.Path(exists=True,
                                                                       dir_okay=False))
@click.option("--budget", required=True, callback=_size, metavar="SIZE",
              help="Fixed memory budget, e.g. 64MiB.")
@click.option("--floor", "floors", multiple=True, callback=_assignments("acc"),
              metavar="MODEL=ACC", help="Accuracy floor of a profiled model (the trace models "
                                        "it backs inherit it), or ACC for all.")
@click.option("--max-requests", type=click.IntRange(min=1), default=None,
              help="Replay only the first N requests.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True,
              help="Profiled batch size: memory is charged at it; requests may not exceed it.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--backend", default="onnxruntime", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Intra-op threads per session (profile with the same for comparable "
                   "latency).")
@click.option("--policy", "policies", multiple=True, metavar="POLICY",
              help="Policy the cache and the simulator run (repeat to compare several; "
                   "default memadapt). Any online policy of `memadapt simulate`.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the report as JSON (one policy: the report; several: "
                   '{"reports": [...]}).')
@_slo_option
@_errors
def replay_cmd(store, trace_path, budget, floors, max_requests, batch, device, backend, threads,
               policies, as_json, slos) -> None:
    """Run a request trace for real through the VariantCache and compare with the simulator.

    For each --policy the real cache runs that policy on the trace's clock
    (requests back to back, swaps made by the request that caused them) and
    the simulator runs it on the same candidates and planning budget; the table
    sets simulated and real miss rate, stall rate, SLO attainment and latency
    side by side. A request that, on the trace's clock, arrives before the load
    it needs has ended counts as waiting for it, as it would in real time.

    \b
    Example:
      memadapt replay --store store --trace t.csv --budget 64MiB --max-requests 500 \\
        --policy memadapt --policy infaas --policy lru
    """
    from adaptive.policies import list_policies, policy_class
    from adaptive.replay import replay

    policies = policies or ("memadapt",)
    for p in policies:
        if p not in list_policies():
            raise click.BadParameter(f"unknown policy {p!r}; known: {', '.join(list_policies())}",
                                     param_hint="--policy")
        if policy_class(p).offline:
            raise click.BadParameter(f"{p!r} is offline (it needs the future trace); replay "
                                     f"runs online policies", param_hint="--policy")
    trace = _read_trace(trace_path)
    families = _load_demands(store, None, device, backend, batch, floors, slos)
    reports = []
    with _Progress(not as_json) as bar:
        for p in policies:
            reports.append(replay(store, trace, budget=budget, device=device, backend=backend,
                                  batch=batch, max_requests=max_requests, threads=threads,
                                  candidates=families, policy=p, progress=bar))
    if as_json:
        out = reports[0].to_dict() if len(reports) == 1 else \
            {"reports": [r.to_dict() for r in reports]}
        click.echo(json.dumps(out, indent=2))
        return
    from rich.table import Table

    first = reports[0]
    t = Table(title=f"replay of {first.requests:,} requests, {len(first.models)} models on "
                    f"{len(set(first.models.values()))} stored, budget {_fmt_bytes(budget)} "
                    f"(planned with {_fmt_bytes(first.plan_budget_bytes)})")
    t.add_column("policy")
    for col in ("metric", "simulated", "real", "difference"):
        t.add_column(col, justify="left" if col == "metric" else "right")
    shown = {"miss_rate": ("miss rate", "{:.4f}", 1),
             "stall_rate": ("stall rate", "{:.4f}", 1),
             "slo_attainment": ("SLO attainment", "{:.4f}", 1),
             "mean_latency_s": ("mean latency", "{:.2f} ms", 1e3),
             "p99_latency_s": ("p99 latency", "{:.2f} ms", 1e3),
             "mean_accuracy": ("mean accuracy", "{:.4f}", 1),
             "evictions": ("evictions", "{:.0f}", 1),
             "downgrades": ("downgrades", "{:.0f}", 1),
             "upgrades": ("upgrades", "{:.0f}", 1)}
    for report in reports:
        for k, m in enumerate(report.metrics):
            label, fmt, scale = shown.get(m.name, (m.name, "{:g}", 1))
            diff = m.difference
            t.add_row(report.policy if k == 0 else "", label, fmt.format(m.simulated * scale),
                      fmt.format(m.real * scale),
                      f"{diff:+.1%}" if diff != float("inf") else "inf",
                      end_section=k == len(report.metrics) - 1)
    _console().print(t)
    runs = Table(title="where latency differs: each served variant's hits (its run and the "
                       "cache's work, no wait), real beside profiled")
    for col in ("policy", "variant", "hits", "profiled", "real", "difference"):
        runs.add_column(col, justify="left" if col in ("policy", "variant") else "right")
    for report in reports:
        for k, r in enumerate(report.runs):
            runs.add_row(report.policy if k == 0 else "", r.variant, f"{r.hits:,}",
                         f"{r.profiled_s * 1e3:.2f} ms", f"{r.real_mean_s * 1e3:.2f} ms",
                         f"{r.difference:+.1%}" if math.isfinite(r.difference) else "inf",
                         end_section=k == len(report.runs) - 1)
    if runs.row_count:
        _console().print(runs)
    for report in reports:
        click.echo(f"{report.policy}: {report.served:,} served, {report.failures} failed, "
                   f"{report.rejected} rejected by the simulator; real replay took "
                   f"{report.wall_s:.1f} s")
        for e in report.errors:
            click.echo(f"  {e}")


def _serve_aliases(ctx, param, values):
    """Repeated ``NAME=STORED_MODEL`` as a dict; malformed or repeated names exit 2."""
    out: dict[str, str] = {}
    for v in values or ():
        name, sep, stored = (x.strip() for x in v.partition("="))
        if not (sep and name and stored):
            raise click.BadParameter(f"{v!r}: expected NAME=STORED_MODEL, e.g. "
                                     f"resnet18-b=resnet18")
        if name in out:
            raise click.BadParameter(f"{name!r} is given twice ({name}={out[name]}, {v})")
        out[name] = stored
    return out


@main.command("serve")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--budget", default=None, metavar="SIZE|cgroup|cuda-free",
              help="Memory budget: a size (512MiB), or follow the cgroup limit or free GPU "
                   "memory. Default: cuda-free on cuda, cgroup on cpu.")
@click.option("--floor", "floors", multiple=True, callback=_assignments("acc"),
              metavar="MODEL=ACC", help="Accuracy floor of a model (repeat), or ACC for all.")
@click.option("--slo", "slos", multiple=True, callback=_assignments("ms"), metavar="MODEL=MS",
              help="Latency objective in ms (repeat), or MS for all; /metrics reports the "
                   "share of requests within it.")
@click.option("--alias", "aliases", multiple=True, callback=_serve_aliases,
              metavar="NAME=STORED_MODEL",
              help="Serve STORED_MODEL under NAME too (repeat): a model of its own, with its "
                   "own requests, floor, SLO and memory, and the stored model's variants.")
@click.option("--policy", default="memadapt", show_default=True,
              help="Caching policy of the VariantCache.")
@click.option("--profiles", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Candidates from a profiles JSON file instead of STORE's catalog.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:<i>.")
@click.option("--backend", type=click.Choice(["onnxruntime", "torch"]), default="onnxruntime",
              show_default=True)
@click.option("--max-batch", type=click.IntRange(min=1), default=8, show_default=True,
              help="Largest batch; variants are charged their memory at this size.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Threads per session.")
@click.option("--rebalance-s", type=click.FloatRange(min=0, min_open=True), default=5.0,
              show_default=True, help="Re-plan period in seconds.")
@click.option("--host-tier", is_flag=True, help="Keep loaded variants' bytes in host memory.")
@click.option("--host-budget", default=None, callback=_size, metavar="SIZE",
              help="Bound of the host tier (implies --host-tier).")
@click.option("--share-weights", is_flag=True,
              help="torch backend: hold tensors several models share once, charge them once.")
@click.option("--max-request-bytes", callback=_size, default="64MiB", show_default=True,
              metavar="SIZE", help="Larger request bodies get 413.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--ray", "use_ray", is_flag=True,
              help="Scale out on Ray Serve (extra memadapt[ray]): one cache per replica, "
                   "requests routed by model.")
@click.option("--replicas", type=click.IntRange(min=1), default=2, show_default=True,
              help="With --ray: how many replicas (each with its own cache and budget).")
@click.option("--ray-address", default=None, metavar="ADDR",
              help="With --ray: join this Ray cluster instead of starting a local one.")
@_errors
def serve_cmd(store, budget, floors, slos, aliases, policy, profiles, device, backend,
              max_batch, threads, rebalance_s, host_tier, host_budget, share_weights,
              max_request_bytes, host, port, use_ray, replicas, ray_address) -> None:
    """Serve STORE's models over the Open Inference Protocol (KServe v2 REST).

    Speaks what tritonclient, the KServe SDK and Seldon speak: /v2/health/ready,
    /v2/models/M (versions = variants), /v2/models/M/infer (JSON and binary tensors),
    /v2/repository/..., plus /v2/memadapt/budget (GET, PUT), /v2/memadapt/plan and /metrics.
    Versioned routes (/v2/models/M/versions/V/...) take version 1 (the model) or a variant.
    """
    from adaptive.serve import AliasError, ServeConfig, serve

    if not use_ray and (replicas != 2 or ray_address):
        raise click.UsageError("--replicas and --ray-address need --ray")
    level = logging.getLogger().getEffectiveLevel()
    try:
        config = ServeConfig(
            store, budget=budget, device=device, backend=backend, floors=floors,
            slos={m: ms / 1e3 for m, ms in slos.items()}, aliases=aliases, policy=policy,
            profiles=profiles, max_batch=max_batch, threads=threads, rebalance_s=rebalance_s,
            keep_host_bytes=host_tier, host_budget=host_budget, share_weights=share_weights,
            host=host, port=port, max_request_bytes=max_request_bytes,
            log_level=logging.getLevelName(level).lower())
        if use_ray:
            from adaptive.serve.scaleout import serve_ray

            serve_ray(config, replicas, ray_address)
        else:
            serve(config)
    except AliasError as e:
        raise click.BadParameter(str(e), param_hint="--alias") from None


if __name__ == "__main__":  # pragma: no cover
    main()
