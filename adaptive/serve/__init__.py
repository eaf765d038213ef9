"""``memadapt serve``: one :class:`~adaptive.cache.VariantCache` behind the Open Inference
Protocol (KServe v2 REST), the protocol ``tritonclient``, the KServe SDK and Seldon speak.

Needs the ``serve`` extra (FastAPI, uvicorn, prometheus-client)::

    from adaptive.serve import ServeConfig, serve
    serve(ServeConfig("store", budget="512MiB", floors={"resnet18": 0.9}, port=8000))

Parts: :mod:`~adaptive.serve.app` (the routes), :mod:`~adaptive.serve.oip` (tensors in and
out, JSON and the binary extension), :mod:`~adaptive.serve.repository` (metadata, readiness,
load/unload), :mod:`~adaptive.serve.metrics` (``/metrics``), :mod:`~adaptive.serve.server`
(config, uvicorn, a server thread).
"""

from __future__ import annotations

from adaptive.serve.app import DEFAULT_MAX_REQUEST_BYTES, create_app
from adaptive.serve.server import AliasError, ServeConfig, ServerThread, build_cache, serve

__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "AliasError", "ServeConfig", "ServerThread", "build_cache",
           "create_app", "serve"]
