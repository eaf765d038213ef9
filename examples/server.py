"""An HTTP inference server that embeds memadapt's VariantCache.

    python examples/server.py --store store --budget 512MiB --floor resnet18=0.9

Endpoints (JSON in and out; every inference response names the variant that
served it in the ``X-Memadapt-Variant`` header):

    POST /v1/models/{model}/infer   {"inputs": [...]} or {"inputs": {"input_ids": [...], ...}}
    GET  /v1/models                 each model's resident variant, floor, accuracy, memory
    PUT  /v1/budget                 {"budget": 536870912} or {"budget": "512MiB"}
    GET  /metrics                   Prometheus text format
    GET  /healthz

Errors: bad JSON or a body over --max-request-bytes -> 400/413, unknown model
-> 404, wrong input names/shape/batch -> 422, a budget that cannot hold the
model at its accuracy floor -> 503 with the reason. Binds to 127.0.0.1 unless
told otherwise. Candidates come from the store's profiler catalog (run
``memadapt profile STORE`` first) or from a ``--profiles`` JSON file (the
format ``memadapt select --profiles`` reads).
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

log = logging.getLogger("memadapt.server")

DEFAULT_MAX_REQUEST_BYTES = 16 * 2**20


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _signature(store, model: str) -> list[dict]:
    """The inputs every variant of ``model`` takes (names, dtypes, shapes, dynamic axes)."""
    return list(store.get(model).inputs)


def parse_inputs(body: Any, signature: list[dict], max_batch: int) -> dict[str, np.ndarray]:
    """Validate a request body against the model's inputs; raise BadRequest(422) with why."""
    if not isinstance(body, dict) or "inputs" not in body:
        raise BadRequest(422, 'body must be a JSON object with "inputs"')
    raw = body["inputs"]
    names = [s["name"] for s in signature]
    if not isinstance(raw, dict):
        if len(names) != 1:
            raise BadRequest(422, f"this model takes inputs {names}: send "
                                  f'{{"inputs": {{name: array, ...}}}}')
        raw = {names[0]: raw}
    missing, extra = set(names) - set(raw), set(raw) - set(names)
    if missing or extra:
        raise BadRequest(422, f"inputs must be exactly {names} (missing {sorted(missing)}, "
                              f"unexpected {sorted(extra)})")
    out, batch = {}, None
    for spec in signature:
        try:
            arr = np.asarray(raw[spec["name"]], dtype=spec["dtype"])
        except (ValueError, TypeError):
            raise BadRequest(422, f"input {spec['name']!r} is not a rectangular array of "
                                  f"{spec['dtype']}") from None
        shape = spec["shape"]
        if arr.ndim != len(shape):
            raise BadRequest(422, f"input {spec['name']!r} has shape {list(arr.shape)}; "
                                  f"expected {shape} (batch first)")
        for got, want in zip(arr.shape, shape):
            if isinstance(want, int) and got != want:
                raise BadRequest(422, f"input {spec['name']!r} has shape {list(arr.shape)}; "
                                      f"expected {shape}")
        if batch is None:
            batch = arr.shape[0]
        elif arr.shape[0] != batch:
            raise BadRequest(422, "all inputs must have the same batch size")
        out[spec["name"]] = arr
    if not batch or batch > max_batch:
        raise BadRequest(422, f"batch size {batch} must be between 1 and {max_batch}")
    return out


def create_app(cache, *, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
    """A FastAPI app serving ``cache`` (a started :class:`adaptive.cache.VariantCache`)."""
    from adaptive.errors import AdaptiveError, InfeasibleBudget
    from adaptive.units import parse_size

    app = FastAPI(title="memadapt", version="1")
    signatures = {m: _signature(cache.store, m) for m in cache.models}
    counters = {"http_requests": 0, "http_errors": 0}
    lock = threading.Lock()

    def error(status: int, message: str, **extra) -> JSONResponse:
        with lock:
            counters["http_errors"] += 1
        return JSONResponse({"error": message, **extra}, status_code=status)

    async def read_json(request: Request) -> Any:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_request_bytes:
            raise BadRequest(413, f"request body of {length} bytes exceeds the limit of "
                                  f"{max_request_bytes}")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_request_bytes:
                raise BadRequest(413, f"request body exceeds the limit of {max_request_bytes}")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(400, f"body is not valid JSON: {e}") from None

    @app.post("/v1/models/{model}/infer")
    async def infer(model: str, request: Request):
        import anyio

        with lock:
            counters["http_requests"] += 1
        if model not in signatures:
            return error(404, f"unknown model {model!r}; served: {sorted(signatures)}")
        try:
            inputs = parse_inputs(await read_json(request), signatures[model], cache.max_batch)
        except BadRequest as e:
            return error(e.status, str(e))
        try:
            res = await anyio.to_thread.run_sync(cache.infer, model, inputs)
        except InfeasibleBudget as e:
            return error(503, str(e), model=model, budget_bytes=e.budget_bytes)
        except AdaptiveError as e:
            return error(422, str(e))
        out = np.asarray(res.output)
        return JSONResponse({"model": model, "variant": res.variant, "cold": res.cold,
                             "shape": list(out.shape), "outputs": out.tolist()},
                            headers={"X-Memadapt-Variant": res.variant})

    @app.get("/v1/models")
    def models():
        st = cache.stats()
        return {"budget_bytes": st.budget_bytes, "resident_bytes": st.bytes_resident,
                "models": [{"model": m.model, "variant": m.variant, "floor": m.floor,
                            "accuracy": m.accuracy, "served_accuracy": m.served_accuracy,
                            "memory_bytes": m.memory_bytes, "requests": m.requests,
                            "rate": m.rate, "inputs": signatures.get(m.model)}
                           for m in st.models.values()]}

    @app.put("/v1/budget")
    async def put_budget(request: Request):
        import anyio

        try:
            body = await read_json(request)
        except BadRequest as e:
            return error(e.status, str(e))
        value = body.get("budget") if isinstance(body, dict) else None
        try:
            budget = parse_size(value) if isinstance(value, (str, int)) and \
                not isinstance(value, bool) else None
        except ValueError as e:
            return error(422, str(e))
        if budget is None:
            return error(422, 'body must be {"budget": bytes} or {"budget": "512MiB"}')
        await anyio.to_thread.run_sync(cache.set_budget, budget)
        st = cache.stats()
        return {"budget_bytes": st.budget_bytes, "resident_bytes": st.bytes_resident,
                "resident": {m.model: m.variant for m in st.models.values()}}

    @app.get("/metrics")
    def metrics():
        st = cache.stats()
        lines = []

        def metric(name, kind, help_, samples):
            lines.append(f"# HELP memadapt_{name} {help_}")
            lines.append(f"# TYPE memadapt_{name} {kind}")
            for labels, v in samples:
                lab = ",".join(f'{k}="{val}"' for k, val in labels.items())
                lines.append(f"memadapt_{name}{{{lab}}} {v}" if lab else f"memadapt_{name} {v}")

        metric("requests_total", "counter", "Inference requests.", [({}, st.requests)])
        metric("hits_total", "counter", "Requests served by a resident variant.", [({}, st.hits)])
        metric("cold_loads_total", "counter", "Loads triggered by requests.",
               [({}, st.cold_loads)])
        metric("swaps_total", "counter", "Variant swaps.",
               [({"kind": "downgrade"}, st.downgrades), ({"kind": "upgrade"}, st.upgrades)])
        metric("evictions_total", "counter", "Models evicted.", [({}, st.evictions)])
        metric("failures_total", "counter", "Requests that raised.", [({}, st.failures)])
        metric("resident_bytes", "gauge", "Bytes charged to the budget.",
               [({}, st.bytes_resident)])
        metric("budget_bytes", "gauge", "The memory budget.", [({}, st.budget_bytes)])
        metric("shared_bytes", "gauge", "Of the resident bytes: tensors shared by several "
               "models, held and charged once (--share-weights).", [({}, st.shared_bytes)])
        metric("host_bytes", "gauge", "The host tier (--host-tier).", [({}, st.host_bytes)])
        metric("http_errors_total", "counter", "HTTP 4xx/5xx responses.",
               [({}, counters["http_errors"])])
        metric("model_requests_total", "counter", "Requests per model.",
               [({"model": m.model}, m.requests) for m in st.models.values()])
        metric("served_accuracy", "gauge", "Mean accuracy of the variants that served a model.",
               [({"model": m.model}, m.served_accuracy) for m in st.models.values()
                if m.served_accuracy is not None])
        metric("resident_variant", "gauge", "1 for the variant resident for a model.",
               [({"model": m.model, "variant": m.variant}, 1) for m in st.models.values()
                if m.variant])
        return PlainTextResponse("\n".join(lines) + "\n",
                                 media_type="text/plain; version=0.0.4")

    @app.get("/healthz")
    def healthz():
        st = cache.stats()
        return {"status": "ok", "models": len(st.models), "budget_bytes": st.budget_bytes}

    return app


def build_cache(args):
    from adaptive.cache import VariantCache

    floors: dict[str, float] = {}
    candidates = None
    if args.profiles:
        from adaptive.catalog import demands_from_json

        demands = demands_from_json(args.profiles)
        candidates = {d.model: list(d.candidates) for d in demands}
        floors = {d.model: d.floor for d in demands if d.floor}
    for f in args.floor or []:  # the command line overrides the file
        model, _, acc = f.rpartition("=")
        floors[model] = float(acc)
    return VariantCache(args.store, device=args.device, budget=args.budget, floors=floors,
                        candidates=candidates, max_batch=args.max_batch,
                        rebalance_interval_s=args.rebalance_s, threads=args.threads,
                        keep_host_bytes=args.host_tier, host_budget=args.host_budget,
                        backend=args.backend, share_weights=args.share_weights)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", required=True, help="variant store (memadapt generate --out)")
    ap.add_argument("--budget", default="1GiB", help="memory budget, e.g. 512MiB, or cgroup")
    ap.add_argument("--floor", action="append", metavar="MODEL=ACC", help="accuracy floor")
    ap.add_argument("--profiles", help="profiles JSON instead of the store's catalog")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="onnxruntime threads per session")
    ap.add_argument("--rebalance-s", type=float, default=5.0, help="re-plan period (seconds)")
    ap.add_argument("--host-tier", action="store_true", help="keep ONNX bytes in host memory")
    ap.add_argument("--host-budget", default=None, help="bound of the host tier, e.g. 2GiB")
    ap.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"])
    ap.add_argument("--share-weights", action="store_true",
                    help="torch backend: hold tensors shared by models (a common backbone) "
                         "once, and charge them once")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES)
    ap.add_argument("--log-level", default="warning")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper())
    import uvicorn

    cache = build_cache(args).start()
    app = create_app(cache, max_request_bytes=args.max_request_bytes)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        cache.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
