"""What the status service checks before it reads a request body: the bearer token, then the body's size.

FastAPI reads and parses a request body before it runs an endpoint's dependencies, so a token check written as
a dependency comes after the service has taken in whatever a caller sent. This ASGI middleware runs first: a
request that may change something (any method but GET, HEAD, OPTIONS) without the right token is answered 401 /
403 with its body unread, and a body over the limit is answered 413 - from its Content-Length when it declares
one, else as soon as the bytes read pass the limit.
"""

from __future__ import annotations

import hmac
import json

__all__ = ["ControlGuard", "token_problem", "MAX_BODY_BYTES"]

MAX_BODY_BYTES = 1 << 20
READ_METHODS = {"GET", "HEAD", "OPTIONS"}


def token_problem(authorization: str | None, token: str | None) -> tuple[int, str] | None:
    """(status, detail) when ``authorization`` (the header's value) does not carry ``token``, else None."""
    if token is None:
        return 403, "control endpoints are disabled: the service was started without a token"
    scheme, _, credentials = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        return 401, "missing bearer token"
    if not hmac.compare_digest(credentials.strip().encode(), token.encode()):
        return 403, "wrong bearer token"
    return None


class ControlGuard:
    def __init__(self, app, token: str | None, max_body_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.token = token
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in READ_METHODS:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        problem = token_problem(headers.get("authorization"), self.token)
        if problem is not None:
            extra = [(b"www-authenticate", b"Bearer")] if problem[0] == 401 else []
            return await _reply(send, *problem, extra)
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return await _reply(send, 413, f"request body over {self.max_body_bytes} bytes")
        body, more = bytearray(), True
        while more:  # chunked bodies declare no length: read up to the limit, no further
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                return await _reply(send, 413, f"request body over {self.max_body_bytes} bytes")
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        return await self.app(scope, replay, send)


async def _reply(send, status: int, detail: str, headers: list | None = None) -> None:
    payload = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close"), *(headers or [])]})
    await send({"type": "http.response.body", "body": payload})
