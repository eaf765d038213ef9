"""Transformation specs: frozen, validated, JSON round-trippable.

A variant is a base model plus a chain of specs in canonical order
(``Prune`` -> ``EarlyExit`` -> ``Quantize``); its name is readable
(``resnet18+prune0.5+exit2+int8``) and stable.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import ClassVar

from variants.errors import SpecError
from variants.registry import Registry

SPEC_VERSION = 1
_SPEC_TYPES: Registry[type[Spec]] = Registry("spec kind", error=SpecError)


def register_spec(cls: type[Spec]) -> type[Spec]:
    """Class decorator: make a spec type known to :func:`spec_from_dict`."""
    return _SPEC_TYPES.register(cls.kind, cls)


def list_spec_kinds() -> list[str]:
    return _SPEC_TYPES.names()


@dataclass(frozen=True)
class Spec:
    """One transformation of a model. Subclasses are frozen dataclasses."""

    kind: ClassVar[str] = ""
    #: "torch" specs transform the nn.Module; "onnx" specs transform the exported graph.
    stage: ClassVar[str] = "torch"
    #: position in the canonical chain order
    order: ClassVar[int] = 0

    @property
    def tag(self) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {"kind": self.kind, "version": SPEC_VERSION, **asdict(self)}


@register_spec
@dataclass(frozen=True)
class Prune(Spec):
    """Structured channel/head pruning; ``ratio`` is the fraction of channels removed."""

    ratio: float
    kind: ClassVar[str] = "prune"
    stage: ClassVar[str] = "torch"
    order: ClassVar[int] = 0

    def __post_init__(self) -> None:
        r = self.ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) \
                or not 0.0 < r < 1.0:
            raise SpecError(f"prune ratio must be a number in the open interval (0, 1), "
                            f"got {r!r}; e.g. Prune(0.5) removes half the channels per layer")
        object.__setattr__(self, "ratio", round(float(r), 4))

    @property
    def tag(self) -> str:
        return f"prune{self.ratio:g}"


@register_spec
@dataclass(frozen=True)
class EarlyExit(Spec):
    """Truncate the model after exit point ``at`` (1-based) and attach a trained head."""

    at: int
    kind: ClassVar[str] = "exit"
    stage: ClassVar[str] = "torch"
    order: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if isinstance(self.at, bool) or not isinstance(self.at, int) or self.at < 1:
            raise SpecError(f"exit point must be an integer >= 1, got {self.at!r}")

    @property
    def tag(self) -> str:
        return f"exit{self.at}"


QUANT_MODES = ("int8", "fp16")


@register_spec
@dataclass(frozen=True)
class Quantize(Spec):
    """Quantize the exported ONNX graph: ``int8`` (CPU) or ``fp16`` (GPU)."""

    mode: str
    kind: ClassVar[str] = "quantize"
    stage: ClassVar[str] = "onnx"
    order: ClassVar[int] = 2

    def __post_init__(self) -> None:
        if self.mode not in QUANT_MODES:
            raise SpecError(f"quantize mode must be one of {', '.join(QUANT_MODES)}, "
                            f"got {self.mode!r}")

    @property
    def tag(self) -> str:
        return self.mode


def spec_from_dict(d: dict) -> Spec:
    """Rebuild a spec from :meth:`Spec.to_dict` output; only known kinds are accepted."""
    if not isinstance(d, dict) or "kind" not in d:
        raise SpecError(f"not a spec dictionary: {d!r}")
    kind = d["kind"]
    cls = _SPEC_TYPES.get(kind)
    version = d.get("version", SPEC_VERSION)
    if version > SPEC_VERSION:
        raise SpecError(f"spec {kind!r} has version {version}, newer than this memadapt "
                        f"understands ({SPEC_VERSION}); upgrade memadapt")
    fields = {k: v for k, v in d.items() if k not in ("kind", "version")}
    try:
        return cls(**fields)
    except TypeError as e:
        raise SpecError(f"bad fields for spec {kind!r}: {fields!r} ({e})") from None


_TAG_RE = re.compile(r"^(?:prune(?P<ratio>[0-9.eE+-]+)|exit(?P<at>[0-9]+)|(?P<q>int8|fp16))$")


def parse_spec(tag: str) -> Spec:
    """Parse one name component (``prune0.5``, ``exit2``, ``int8``, ``fp16``)."""
    m = _TAG_RE.match(tag.strip())
    if not m:
        raise SpecError(f"cannot parse spec {tag!r}; expected prune<ratio>, exit<k>, int8 or fp16")
    if m["ratio"] is not None:
        try:
            ratio = float(m["ratio"])
        except ValueError:
            raise SpecError(f"bad prune ratio in {tag!r}") from None
        return Prune(ratio)
    if m["at"] is not None:
        return EarlyExit(int(m["at"]))
    return Quantize(m["q"])


def validate_chain(specs: Iterable[Spec]) -> tuple[Spec, ...]:
    """Check a spec chain makes sense and return it as a tuple.

    Allowed: at most one spec of each kind, in the order prune -> exit -> quantize
    (a graph is quantized last because pruning and truncation need float weights).
    """
    chain = tuple(specs)
    for s in chain:
        if not isinstance(s, Spec):
            raise SpecError(f"not a spec: {s!r}")
    kinds = [s.kind for s in chain]
    for k in set(kinds):
        if kinds.count(k) > 1:
            raise SpecError(f"a variant can apply {k!r} only once, got chain "
                            f"{'+'.join(s.tag for s in chain)}")
    if [s.order for s in chain] != sorted(s.order for s in chain):
        canon = "+".join(s.tag for s in sorted(chain, key=lambda s: s.order))
        raise SpecError(f"spec chain {'+'.join(s.tag for s in chain)} is out of order: "
                        f"prune comes before exit, and quantization last (use {canon})")
    return chain


def variant_name(base: str, specs: Sequence[Spec]) -> str:
    """Canonical readable name: ``base+tag+tag``."""
    return "+".join([base, *(s.tag for s in validate_chain(specs))])


def parse_variant_name(name: str) -> tuple[str, tuple[Spec, ...]]:
    """Inverse of :func:`variant_name` (the base is everything before the first ``+``)."""
    base, *tags = name.split("+")
    return base, validate_chain(parse_spec(t) for t in tags)
