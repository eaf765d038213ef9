"""The FastAPI app: one :class:`VariantCache` behind the Open Inference Protocol (KServe v2
REST), its model repository extension, and memadapt's own budget and plan endpoints.

Every model route has its versioned form (``/v2/models/M/versions/V/...``): a version is
``"1"`` (the model) or one of its variants, and never forces a variant (see
:mod:`adaptive.serve.repository`).

Errors are the protocol's ``{"error": "..."}``: 400 bad input (the message names the input),
404 unknown model or version, 413 body over the size limit, 503 a model that cannot be served
now (its floor does not fit the budget, or it is unloaded).
"""

from __future__ import annotations

import gzip
import logging
import zlib
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from adaptive.errors import AdaptiveError, InfeasibleBudget
from adaptive.serve import schemas as S
from adaptive.serve.limits import BodyLimit
from adaptive.serve.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from adaptive.serve.oip import HEADER_LENGTH, OIPError, decode_request, encode_response
from adaptive.serve.repository import MODEL_VERSION, Repository, describe

__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "create_app"]

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 64 * 2**20
EXTENSIONS = ["binary_tensor_data", "model_repository", "memadapt_budget"]


def _documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": S.Error} for s in statuses}


_INFER_BODY = {
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                     "description": "binary tensor extension: the JSON "
                                     "header, then the inputs' bytes"}}},
    "parameters": [{"name": HEADER_LENGTH, "in": "header", "required": False,
                    "schema": {"type": "integer", "minimum": 0},
                    "description": "bytes of JSON before the binary tensors"}],
    "responses": {"200": {"content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/InferenceResponse"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}},
}


def _body(model: type, required: bool = True) -> dict[str, Any]:
    """OpenAPI for a JSON body parsed by :func:`_json` (whatever its Content-Type says)."""
    return {"requestBody": {"required": required, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


async def _json(request: Request, model: type) -> Any:
    """The body as ``model``, None when empty; 400 naming what is wrong. Clients of the
    protocol (tritonclient) send JSON without a Content-Type, so none is required."""
    raw = await request.body()
    if not raw.strip():
        return None
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        why = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
                        for err in e.errors())
        raise OIPError(400, f"bad request body: {why}") from None


def _input_fault(e: BaseException) -> bool:
    """Whether a session's error is about the values it was given (ids outside the
    vocabulary, an image too small for the network), which the shape checks cannot catch;
    anything else (a broken file, a bug) is the server's fault."""
    from variants.errors import BackendError, StoreError

    if isinstance(e, StoreError):
        return False
    if isinstance(e, (AdaptiveError, BackendError)):
        return True
    kind = type(e)
    if kind.__module__.startswith("onnxruntime"):  # InvalidArgument, Fail, RuntimeException
        return True
    return kind in (IndexError, ValueError, RuntimeError)  # what torch raises for such inputs


def _decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    if not encoding or encoding == "identity":
        return body
    try:
        if encoding == "gzip":
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            d = zlib.decompressobj()
        else:
            raise OIPError(400, f"Content-Encoding {encoding!r} is not supported (gzip, deflate)")
        out = d.decompress(body, limit + 1)
    except (zlib.error, gzip.BadGzipFile) as e:
        raise OIPError(400, f"the body is not valid {encoding}: {e}") from None
    if len(out) > limit:
        raise OIPError(413, f"the decompressed body exceeds the limit of {limit} bytes")
    return out


def create_app(cache: Any, *, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               slos: Mapping[str, float] | None = None, title: str = "memadapt") -> FastAPI:
    """An app serving ``cache`` (a started :class:`~adaptive.cache.VariantCache`).

    ``slos`` maps models to latency objectives in seconds (``/metrics`` reports the share of
    requests within them); ``max_request_bytes`` bounds every request body (413 beyond).
    """
    unknown = sorted(set(slos or {}) - set(cache.models))
    if unknown:
        raise AdaptiveError(f"SLOs name unknown models {unknown}; served: {sorted(cache.models)}")
    repo = Repository(cache, describe(cache))
    metrics = ServerMetrics(cache, slos)
    app = FastAPI(title=title, version="2", description=__doc__)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
    app.state.cache, app.state.repository, app.state.metrics = cache, repo, metrics
    app.state.serving = True

    def fail(status: int, message: str, **extra: Any) -> JSONResponse:
        metrics.error(status)
        return JSONResponse({"error": message, **extra}, status_code=status)

    @app.exception_handler(OIPError)
    async def _oip(request: Request, e: OIPError) -> JSONResponse:
        return fail(e.status, str(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        why = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}"
                        for err in e.errors())
        return fail(400, f"bad request: {why}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return fail(e.status_code, str(e.detail))

    # -- health and metadata ----------------------------------------------------------------

    @app.get("/v2", response_model=S.ServerMetadata)
    def server_metadata():
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("memadapt")
        except PackageNotFoundError:
            v = "unknown"
        return {"name": "memadapt", "version": v, "extensions": EXTENSIONS}

    @app.get("/v2/health/live", response_model=S.Live)
    def live():
        return {"live": True}

    @app.get("/v2/health/ready", response_model=S.Ready, responses=_documented(503))
    def ready():
        if not app.state.serving:
            return fail(503, "the server is shutting down")
        return {"ready": True}

    @app.get("/v2/models/{model}", response_model=S.ModelMetadata, responses=_documented(404))
    def model_metadata(model: str):
        return repo.info(model).metadata()

    @app.get("/v2/models/{model}/versions/{version}", response_model=S.ModelMetadata,
             responses=_documented(404))
    def version_metadata(model: str, version: str):
        info = repo.info(model)
        info.check_version(version)
        return info.metadata()

    @app.get("/v2/models/{model}/ready", response_model=S.ModelReady,
             responses=_documented(404, 503))
    def model_ready(model: str):
        why = repo.unavailable_reason(model)
        if why is not None:
            return fail(503, why, name=model, ready=False)
        return {"name": model, "ready": True}

    @app.get("/v2/models/{model}/versions/{version}/ready", response_model=S.ModelReady,
             responses=_documented(404, 503))
    def version_ready(model: str, version: str):
        repo.info(model).check_version(version)
        if version == MODEL_VERSION:
            return model_ready(model)
        resident = cache.resident().get(model)
        if repo.unavailable_reason(model) is None and resident == version:
            return {"name": model, "ready": True}
        return fail(503, f"variant {version!r} of {model!r} is not resident (resident: "
                         f"{resident or 'none'}); memadapt chooses the variant",
                    name=model, ready=False)

    # -- inference --------------------------------------------------------------------------

    @app.post("/v2/models/{model}/infer", openapi_extra=_INFER_BODY,
              responses=_documented(400, 404, 413, 503))
    async def infer(model: str, request: Request):
        return await run_infer(model, request)

    @app.post("/v2/models/{model}/versions/{version}/infer", openapi_extra=_INFER_BODY,
              responses=_documented(400, 404, 413, 503))
    async def version_infer(model: str, version: str, request: Request):
        # a version names the model (or one of its variants), never forces a variant
        repo.info(model).check_version(version)
        return await run_infer(model, request)

    async def run_infer(model: str, request: Request) -> Response:
        repo.check_servable(model)
        info = repo.info(model)
        body = _decompress(await request.body(), request.headers.get("content-encoding"),
                           max_request_bytes)
        req = decode_request(body, request.headers.get(HEADER_LENGTH), info.inputs,
                             info.outputs, cache.max_batch)
        try:
            res = await run_in_threadpool(cache.infer, model, req.inputs)
        except InfeasibleBudget as e:
            metrics.failed(model)
            return fail(503, str(e), budget_bytes=e.budget_bytes)
        except Exception as e:  # noqa: BLE001 - sorted into the client's fault or ours
            metrics.failed(model)
            if not _input_fault(e):
                log.exception("model %r failed", model)
                return fail(500, f"model {model!r} failed: {type(e).__name__}: {e}")
            log.info("model %r refused a request: %s", model, e)
            return fail(400, f"model {model!r} could not run these inputs: {e}")
        metrics.served(model, res.variant, res.latency_s, res.cold)
        content, head = encode_response(
            model, res.variant, req, {info.outputs[0].name: res.output},
            {"memadapt_variant": res.variant, "memadapt_cold": res.cold})
        if head is None:
            return Response(content, media_type="application/json")
        return Response(content, media_type="application/octet-stream",
                        headers={HEADER_LENGTH: str(head)})

    # -- model repository extension ---------------------------------------------------------

    @app.post("/v2/repository/index", response_model=list[S.IndexEntry],
              openapi_extra=_body(S.IndexRequest, required=False),
              responses=_documented(400))
    async def repository_index(request: Request):
        body = await _json(request, S.IndexRequest)
        return await run_in_threadpool(repo.index, bool(body and body.ready))

    @app.post("/v2/repository/models/{model}/load", response_model=S.Loaded,
              openapi_extra=_body(S.LoadRequest, required=False),
              responses=_documented(400, 404, 503))
    async def repository_load(model: str, request: Request):
        repo.info(model)
        await _json(request, S.LoadRequest)
        try:
            variant = await run_in_threadpool(repo.load, model)
        except InfeasibleBudget as e:
            return fail(503, str(e), budget_bytes=e.budget_bytes)
        return {"name": model, "variant": variant}

    @app.post("/v2/repository/models/{model}/unload", response_model=S.Unloaded,
              openapi_extra=_body(S.LoadRequest, required=False),
              responses=_documented(400, 404))
    async def repository_unload(model: str, request: Request):
        repo.info(model)
        await _json(request, S.LoadRequest)
        repo.unload(model)
        return {"name": model}

    # -- memadapt's own ---------------------------------------------------------------------

    def budget_view() -> dict[str, Any]:
        st = cache.stats()
        return {"budget_bytes": st.budget_bytes, "plan_budget_bytes": cache.plan_budget,
                "resident_bytes": st.bytes_resident, "source": repr(cache.budget_source),
                "resident": {m.model: m.variant for m in st.models.values() if m.variant}}

    @app.get("/v2/memadapt/budget", response_model=S.Budget)
    def get_budget():
        return budget_view()

    @app.put("/v2/memadapt/budget", response_model=S.Budget, responses=_documented(400),
             openapi_extra=_body(S.BudgetRequest))
    async def put_budget(request: Request):
        body = await _json(request, S.BudgetRequest)
        if body is None:
            raise OIPError(400, 'send {"budget": bytes, "512MiB", "cgroup" or "cuda-free"}')
        try:
            await run_in_threadpool(cache.set_budget, body.budget)
        except (AdaptiveError, ValueError) as e:
            return fail(400, str(e))
        return budget_view()

    @app.get("/v2/memadapt/plan", response_model=S.PlanView)
    def plan():
        from adaptive.select import ModelDemand, select

        st = cache.stats()
        # a model nobody asked for yet still gets planned, after every requested one
        demands = [ModelDemand(m, cache.candidates(m), floor=s.floor, rate=s.rate + 1e-9)
                   for m, s in st.models.items()]
        # what the policy plans with: the budget less the headroom for one load's peak
        limit = cache.plan_budget
        p = select(demands, limit, objective=cache.objective,
                   resident={m: s.variant for m, s in st.models.items()})
        rows = [{"model": m, "resident": s.variant, "planned": p.choice.get(m),
                 "floor": s.floor, "rate": s.rate,
                 "memory_bytes": p.details[m].memory_bytes if p.details.get(m) else 0}
                for m, s in st.models.items()]
        return {"budget_bytes": st.budget_bytes, "plan_budget_bytes": limit,
                "resident_bytes": st.bytes_resident, "planned_bytes": p.memory_bytes,
                "objective": p.objective, "models": rows}

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
    def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            versions = sorted({MODEL_VERSION, *(v for i in repo.models.values()
                                                for v in i.versions)})
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            _, defs = models_json_schema([(m, "validation") for m in S.BODY_ONLY] +
                                         [(S.InferenceResponse, "serialization")],
                                         ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(
                defs.get("$defs", {}))
            for path in schema.get("paths", {}).values():
                for op in path.values():
                    # validation errors are answered 400 (see _invalid), never 422
                    op.get("responses", {}).pop("422", None)
                    for p in op.get("parameters", []):
                        if p.get("in") != "path":
                            continue
                        if p.get("name") == "model":
                            p["schema"] = {**p["schema"], "enum": sorted(repo.models)}
                        elif p.get("name") == "version":
                            p["schema"] = {**p["schema"], "enum": versions}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
