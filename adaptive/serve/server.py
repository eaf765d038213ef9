"""Running the server: a frozen :class:`ServeConfig`, the cache it builds, uvicorn in front.

``serve(config)`` blocks (what ``memadapt serve`` calls); :class:`ServerThread` runs the same
server in a background thread of this process on a free port (tests, notebooks, load tests).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from adaptive.errors import AdaptiveError
from adaptive.serve.app import DEFAULT_MAX_REQUEST_BYTES, create_app

__all__ = ["AliasError", "ServeConfig", "ServerThread", "build_cache", "serve"]

log = logging.getLogger(__name__)


class AliasError(AdaptiveError):
    """An alias of :class:`ServeConfig` that cannot be served (the message says which)."""


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``memadapt serve`` takes.

    ``budget``: bytes, a size (``"512MiB"``), or a source name (``"cgroup"``, ``"cuda-free"``);
    None: free GPU memory on ``cuda``, the cgroup limit on ``cpu``. ``floors`` maps models to
    accuracy floors, ``slos`` to latency objectives in seconds. ``profiles``: a profiles JSON
    file (``memadapt select --profiles`` format) instead of the store's catalog; its floors
    apply unless ``floors`` overrides them. ``host_budget`` bounds the host tier (which
    ``keep_host_bytes`` turns on; a host budget implies it). ``aliases`` maps more served
    model names to a stored model (one of the store's models or the profiles'): each alias is
    a model of its own (its own requests, floor, SLO, sessions and memory) with the stored
    model's variants, served beside it; floors and SLOs may name aliases.
    """

    store: str
    budget: Any = None
    device: str = "cpu"
    backend: str = "onnxruntime"
    floors: Mapping[str, float] = field(default_factory=dict)
    slos: Mapping[str, float] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=dict)
    policy: str = "memadapt"
    profiles: str | None = None
    max_batch: int = 8
    threads: int | None = None
    rebalance_s: float | None = 5.0
    keep_host_bytes: bool = False
    host_budget: Any = None
    share_weights: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    log_level: str = "warning"

    def __post_init__(self) -> None:
        for name, m in (("floors", self.floors), ("slos", self.slos),
                        ("aliases", self.aliases)):
            if not isinstance(m, Mapping):
                raise AdaptiveError(f"{name} must be a mapping, got {m!r}")
            object.__setattr__(self, name, dict(m))
        for alias, stored in self.aliases.items():
            if not (isinstance(alias, str) and isinstance(stored, str) and alias and stored):
                raise AliasError(f"an alias maps a served name to a stored model, both "
                                 f"non-empty strings; got {alias!r}: {stored!r}")
            if alias == "*" or alias == stored or "/" in alias:
                raise AliasError(f"alias {alias!r} -> {stored!r}: a served name must differ "
                                 f"from the stored model and be neither '*' nor contain '/'")
        for model, s in self.slos.items():
            if not (isinstance(s, (int, float)) and s > 0):
                raise AdaptiveError(f"SLO of {model!r} must be > 0 seconds, got {s!r}")
        if not 0 <= self.port <= 65535:
            raise AdaptiveError(f"port must be in 0..65535, got {self.port}")
        if self.max_request_bytes < 1:
            raise AdaptiveError(f"max_request_bytes must be >= 1, got {self.max_request_bytes}")


def per_model(values: Mapping[str, float], models: Any) -> dict[str, float]:
    """``values`` with a ``*`` entry given to every model of ``models`` lacking its own."""
    out = dict(values)
    every = out.pop("*", None)
    return out if every is None else {**dict.fromkeys(models, every), **out}


def with_aliases(aliases: Mapping[str, str], candidates: Mapping[str, Any],
                 floors: Mapping[str, float]) -> tuple[dict[str, Any], dict[str, float]]:
    """``candidates`` and ``floors`` with each alias given its stored model's (a copy).

    Raises :class:`AliasError` for an alias of a model that is not there, or one that takes
    a stored model's name."""
    out, fl = dict(candidates), dict(floors)
    for alias, stored in aliases.items():
        if stored not in candidates:
            raise AliasError(f"alias {alias!r} names {stored!r}, which is not a served model; "
                             f"known: {', '.join(sorted(candidates))}")
        if alias in candidates:
            raise AliasError(f"alias {alias!r} is already a stored model's name; pick "
                             f"another served name")
        out[alias] = list(candidates[stored])
        if stored in fl:
            fl[alias] = fl[stored]
    return out, fl


def served_models(config: ServeConfig, store: Any = None
                  ) -> tuple[dict[str, Any], dict[str, float]]:
    """The candidates of every model ``config`` serves (aliases included) and the floors the
    profiles give them; raises :class:`AliasError` for an alias that cannot be served."""
    from adaptive.cache import catalog_candidates
    from variants.store import Store

    store = Store(config.store) if store is None else store
    floors: dict[str, float] = {}
    if config.profiles:
        from adaptive.catalog import demands_from_json

        demands = demands_from_json(config.profiles)
        candidates = {d.model: list(d.candidates) for d in demands}
        floors = {d.model: d.floor for d in demands if d.floor}
    else:
        candidates = catalog_candidates(store, config.device, config.backend, config.max_batch)
    return with_aliases(config.aliases, candidates, floors)


def build_cache(config: ServeConfig) -> Any:
    """The :class:`VariantCache` ``config`` describes (not started). A floor (or SLO) under
    the model name ``*`` applies to every model without its own."""
    from adaptive.cache import CacheConfig, VariantCache
    from variants.store import Store

    store = Store(config.store)
    candidates, floors = served_models(config, store)
    floors.update(per_model(config.floors, candidates))
    slos = per_model(config.slos, candidates)
    # a server owns its process: pin the allocator so resident memory follows the catalog
    return VariantCache(store, CacheConfig(
        device=config.device, backend=config.backend, budget=config.budget, floors=floors,
        slos=slos, max_batch=config.max_batch, policy=config.policy,
        rebalance_interval_s=config.rebalance_s, threads=config.threads,
        keep_host_bytes=config.keep_host_bytes or config.host_budget is not None,
        host_budget=config.host_budget, share_weights=config.share_weights,
        aliases=config.aliases, pin_allocator=True), candidates=candidates)


def serve(config: ServeConfig) -> None:
    """Build the cache, start it, and serve it with uvicorn until interrupted."""
    import uvicorn

    cache = build_cache(config).start()
    try:
        app = create_app(cache, max_request_bytes=config.max_request_bytes,
                         slos=per_model(config.slos, cache.models))
        log.warning("memadapt serving %d models on http://%s:%d (budget %d bytes)",
                    len(cache.models), config.host, config.port, cache.budget)
        uvicorn.run(app, host=config.host, port=config.port, log_level=config.log_level)
    finally:
        cache.close()


class ServerThread:
    """``with ServerThread(app) as url:`` serves ``app`` on loopback from a daemon thread.

    ``port=0`` takes a free port; ``url`` is known once the server listens.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning"):
        import uvicorn

        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port,
                                                     log_level=log_level, lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, name="memadapt-serve",
                                        daemon=True)
        self.url: str | None = None

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise AdaptiveError("the server did not start (port in use?)")
            time.sleep(0.02)
        sock = self._server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self.url

    def __exit__(self, *exc: Any) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
