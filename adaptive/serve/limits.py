"""A bound on request bodies, applied before any route reads them (413 beyond it)."""

from __future__ import annotations

import json
from typing import Any

from starlette.exceptions import HTTPException

__all__ = ["BodyLimit"]


class BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` with 413, by their Content-Length
    when they declare one, else as soon as the streamed bytes pass the limit."""

    def __init__(self, app: Any, max_bytes: int):
        if max_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {max_bytes}")
        self.app = app
        self.max_bytes = int(max_bytes)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            body = json.dumps({"error": f"request body of {int(length)} bytes exceeds the "
                                        f"limit of {limit} (--max-request-bytes)"}).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        seen = 0

        async def bounded() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    # the app's exception handler turns this into {"error": ...}
                    raise HTTPException(413, f"request body exceeds the limit of {limit} "
                                             f"bytes (--max-request-bytes)")
            return message

        await self.app(scope, bounded, send)
