"""Scale-out on Ray Serve (extra ``memadapt[ray]``): ``memadapt serve STORE --ray --replicas N``.

Two deployments. ``Replica`` (N of them) each builds its own :class:`VariantCache` and the
same app :func:`~adaptive.serve.app.create_app` makes, with its own budget (``--budget``, or by
default its device's: the cgroup on CPU, free memory of the GPU Ray gave it). ``Router`` (the
HTTP ingress) finds the model in the path (``/v2/models/M/...``, ``/v2/repository/models/M/
...``) or in the ``serve_multiplexed_model_id`` header and calls a replica through Serve's model
multiplexing, so a model's requests go to the replicas that already serve it; Serve's own
count-limited LRU never evicts here (every replica may hold every model), memory is left to
each replica's cache.

Requests without a model (health, ``/metrics``, ``/v2/memadapt/budget``) reach one replica:
a budget ``PUT`` changes that replica's budget only. Every answer names the replica that gave
it (its process id, in the ``x-memadapt-replica`` header).
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any
from urllib.parse import unquote

from adaptive.errors import AdaptiveError
from adaptive.serve.server import ServeConfig

__all__ = ["Replica", "Router", "call_asgi", "model_of", "serve_ray"]

log = logging.getLogger(__name__)

MODEL_HEADER = "serve_multiplexed_model_id"
REPLICA_HEADER = "x-memadapt-replica"
_MODEL_PATH = re.compile(r"^/v2/(?:repository/)?models/([^/]+)")


def model_of(path: str, headers: dict[str, str]) -> str:
    """The model a request is for ('' for none): the multiplexing header, else the path."""
    if headers.get(MODEL_HEADER):
        return headers[MODEL_HEADER]
    m = _MODEL_PATH.match(path)
    return unquote(m.group(1)) if m else ""


async def call_asgi(app: Any, method: str, path: str, query: bytes,
                    headers: list[tuple[bytes, bytes]], body: bytes
                    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Run one request through an ASGI ``app`` in this process; (status, headers, body)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": query, "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0)}
    sent = False
    start: dict[str, Any] = {}
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return int(start.get("status", 500)), list(start.get("headers", [])), b"".join(chunks)


class Replica:
    """One Ray Serve replica: its own cache and app (a deployment made by :func:`serve_ray`)."""

    def __init__(self, config: ServeConfig):
        from ray import serve

        from adaptive.serve.app import create_app
        from adaptive.serve.server import build_cache, per_model

        self.cache = build_cache(config).start()
        self.app = create_app(self.cache, max_request_bytes=config.max_request_bytes,
                              slos=per_model(config.slos, self.cache.models))
        async def serving(model: str) -> str:
            return model

        # Serve tracks which replica serves which model through this; the cache holds the
        # memory, so Serve's count limit is set beyond any store's number of models
        self._serving = serve.multiplexed(max_num_models_per_replica=1 << 20)(serving)

    async def handle(self, method: str, path: str, query: bytes,
                     headers: list[tuple[bytes, bytes]], body: bytes
                     ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        from ray import serve

        model = serve.get_multiplexed_model_id()
        if model:
            await self._serving(model)
        status, out, content = await call_asgi(self.app, method, path, query, headers, body)
        # which replica answered (its process id): per-replica budgets and memory from outside
        return status, [*out, (REPLICA_HEADER.encode(), str(os.getpid()).encode())], content

    def __del__(self) -> None:
        cache = getattr(self, "cache", None)
        if cache is not None:
            cache.close()


class Router:
    """The HTTP ingress: forwards each request to a replica, multiplexed by its model."""

    def __init__(self, replica: Any):
        self.replica = replica

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import Response

        body = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        model = model_of(request.url.path, headers)
        handle = self.replica.options(multiplexed_model_id=model) if model else self.replica
        status, out_headers, content = await handle.handle.remote(
            request.method, request.url.path, request.url.query.encode(),
            [(k.encode(), v.encode()) for k, v in request.headers.items()], body)
        keep = {k.decode(): v.decode() for k, v in out_headers if k.lower() != b"content-length"}
        return Response(content, status_code=status, headers=keep)


def _deployments(config: ServeConfig, replicas: int) -> Any:
    from ray import serve

    gpu = config.device.startswith("cuda")
    if gpu and config.device not in ("cuda", "cuda:0"):
        raise AdaptiveError("with --ray, use --device cuda: Ray gives each replica its own GPU, "
                            "which it sees as cuda:0")
    replica = serve.deployment(
        Replica, name="memadapt-replica", num_replicas=replicas,
        ray_actor_options={"num_cpus": 0, "num_gpus": 1 if gpu else 0})
    router = serve.deployment(Router, name="memadapt-router",
                              ray_actor_options={"num_cpus": 0})
    return router.bind(replica.bind(config))


def serve_ray(config: ServeConfig, replicas: int, address: str | None = None, *,
              block: bool = True) -> str:
    """Deploy ``replicas`` caches behind one HTTP endpoint on a local Ray instance (or the
    cluster at ``address``); returns the URL. ``block`` waits until interrupted, then shuts
    the application down."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise AdaptiveError("--ray needs Ray Serve: pip install 'memadapt[ray]'") from None
    if replicas < 1:
        raise AdaptiveError(f"replicas must be >= 1, got {replicas}")
    from adaptive.serve.server import served_models

    served_models(config)  # a bad alias is refused here, not in every replica
    ray.init(address=address, include_dashboard=False, ignore_reinit_error=True,
             log_to_driver=False)
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(_deployments(config, replicas), name="memadapt", route_prefix="/")
    url = f"http://{config.host}:{config.port}"
    log.warning("memadapt serving on %s through Ray Serve, %d replicas", url, replicas)
    if not block:
        return url
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return url
