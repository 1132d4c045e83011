"""Checks made before a request body is read: API key, Content-Length, bytes in flight; a request id for each.

This is plain ASGI middleware rather than FastAPI dependencies because FastAPI parses (and
spools) the whole multipart body before any dependency runs: a client without a key could
otherwise make the server receive 200 MB before being told 401. Here the key and the declared
size are checked from the headers alone, a chunked body is cut off as soon as it passes the
limit, and the bytes being received or decoded at once are capped (503 with Retry-After).
"""

from __future__ import annotations

import hmac
import json
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from histoscan.serving.state import ServeSettings
from histoscan.serving.uploads import size_message

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_ID = "histoscan.request_id"  # scope key; also sent back as the X-Request-ID header
MULTIPART_SLACK = 64 * 1024  # multipart framing around one file: boundaries and part headers
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def needs_key(path: str) -> bool:
    """Routes behind the API key (the page, /health and the docs stay open)."""
    return path == "/ready" or path.startswith("/v1/")


def key_ok(headers: dict[bytes, bytes], key: str) -> bool:
    """``Authorization: Bearer <key>``, compared in constant time."""
    scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


def request_id(scope: Scope) -> str:
    """The id of the request ``scope`` belongs to ("-" outside the guard)."""
    return str(scope.get(REQUEST_ID, "-"))


class ByteBudget:
    """Bytes of request bodies being received or decoded at once (one event loop: no lock needed)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def take(self, n: int) -> bool:
        """Reserve ``n`` bytes; False when they do not fit in the budget."""
        if self.used and self.used + n > self.limit:  # one request alone always fits
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        """Give back ``n`` bytes."""
        self.used -= n


class RequestGuard:
    """ASGI middleware: request id, then key, Content-Length and in-flight checks before the app reads the body."""

    def __init__(self, app: ASGIApp, settings: ServeSettings) -> None:
        self.app, self.settings = app, settings
        self.inflight = ByteBudget(int(settings.max_inflight_mb * 1_000_000))

    def limit(self, path: str) -> tuple[int, str]:
        """Most body bytes for ``path`` and the name of that limit."""
        if path.rstrip("/") == "/v1/predict/batch":
            return self.settings.request_limit, "request"
        return self.settings.upload_limit + MULTIPART_SLACK, "upload"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the key and the request's size limits, then pass the request on."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = uuid.uuid4().hex[:16]
        scope[REQUEST_ID] = rid
        send = _with_request_id(send, rid)
        headers = dict(scope.get("headers") or [])
        key = self.settings.api_key
        if key and needs_key(scope["path"]) and not key_ok(headers, key):
            await reply(
                send,
                401,
                "missing or wrong API key (send 'Authorization: Bearer <key>')",
                {"www-authenticate": "Bearer"},
            )
            return
        if scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        limit, kind = self.limit(scope["path"])
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await reply(send, 400, "invalid Content-Length header")
                return
            if int(declared) > limit:
                await reply(send, 413, size_message("the request body", int(declared), kind, limit - _slack(kind)))
                return
        reserve = int(declared) if declared is not None else limit
        if not self.inflight.take(reserve):
            await reply(send, 503, "server busy: too many uploads in flight; retry shortly", {"retry-after": "1"})
            return
        try:
            await self._guarded(scope, receive, send, limit, kind)
        finally:
            self.inflight.give(reserve)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, limit: int, kind: str) -> None:
        """Run the app, cutting the body off at ``limit`` bytes (a chunked or lying upload) with a 413."""
        state = {"got": 0, "over": False, "started": False}

        async def counted() -> Message:
            if state["over"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                state["got"] += len(message.get("body", b""))
                if state["got"] > limit:
                    state["over"] = True  # the app sees a client that went away; it reads no further
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if state["over"]:
                return  # whatever the app answers to the cut-off body, the client gets the 413 below
            state["started"] = True
            await send(message)

        try:
            await self.app(scope, counted, guarded_send)
        except Exception:
            if not state["over"]:
                raise
        if state["over"] and not state["started"]:
            message = size_message("the request body", int(state["got"]), kind, limit - _slack(kind))
            await reply(send, 413, message.replace(" is ", " is at least ", 1))  # the rest was never read


def _slack(kind: str) -> int:
    return MULTIPART_SLACK if kind == "upload" else 0


def _with_request_id(send: Send, rid: str) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
        await send(message)

    return wrapped


async def reply(send: Send, status: int, error: str, headers: dict[str, str] | None = None) -> None:
    """A JSON ``{"error": ...}`` answer sent straight from the middleware."""
    body = json.dumps({"error": error}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
