"""Checks made before a request body is read: API key, Content-Length, bytes in flight; a request id for each.

This is plain ASGI middleware rather than FastAPI dependencies because FastAPI parses (and
spools) the whole multipart body before any dependency runs: a client without a key could
otherwise make the server receive 200 MB before being told 401. Here the key and the declared
size are checked from the headers alone, a chunked body is cut off as soon as it passes the
limit, the bytes being received or decoded at once are capped as they arrive, in all and per
client address (503 with Retry-After), and a body that stalls or takes too long is answered 408
and its connection closed.

What this layer cannot see: the request line and headers. uvicorn has no timeout for them, so a
public server sits behind a reverse proxy that bounds them (docs/incoming/36.md has the setup).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
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
# routes whose queue is checked before their body is read: a flood against a full queue costs no parsing
ADMITTED_FIRST = {"/v1/explain": "explain", "/v1/preview": "preview"}


def needs_key(path: str) -> bool:
    """Routes behind the API key: everything that touches the model or its state.

    Open: ``/health`` (liveness), the page ``/`` (static HTML; it asks for the key itself) and
    ``/docs``, ``/redoc``, ``/openapi.json`` (the API's description, no model data).
    """
    return path in ("/ready", "/metrics") or path.startswith("/v1/")


def key_ok(headers: dict[bytes, bytes], key: str) -> bool:
    """``Authorization: Bearer <key>``, compared in constant time."""
    scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


def request_id(scope: Scope) -> str:
    """The id of the request ``scope`` belongs to ("-" outside the guard)."""
    return str(scope.get(REQUEST_ID, "-"))


class UploadBudget:
    """Request-body bytes received and not yet released, in all and per client address.

    Bytes are counted as they arrive, never reserved for what a Content-Length header claims:
    a client that claims 64 MB and sends 1 byte a second holds 1 byte a second (and the body
    deadlines end it). One client address may hold at most ``share`` of the whole allowance,
    so no single client can lock the others out. A request that holds every byte in use may
    always go on (one request alone always fits; its own limit bounds it). One event loop:
    no lock needed.
    """

    def __init__(self, limit: int, share: float) -> None:
        self.limit, self.client_limit = limit, max(1, int(limit * share))
        self.used = 0
        self.by_client: dict[str, int] = {}
        self.receiving = 0  # request bodies being received now
        self.refused = 0

    def take(self, client: str, held: int, n: int) -> str | None:
        """Count ``n`` more bytes for a request of ``client`` that holds ``held``; the reason when refused."""
        mine = self.by_client.get(client, 0)
        if self.used + n > self.limit and self.used > held:
            self.refused += 1
            return "server busy: too many uploads in flight; retry shortly"
        if mine + n > self.client_limit and mine > held:
            self.refused += 1
            return "server busy: this client has too many uploads in flight; retry shortly"
        self.used += n
        self.by_client[client] = mine + n
        return None

    def give(self, client: str, n: int) -> None:
        """Release the ``n`` bytes a finished request of ``client`` held."""
        self.used -= n
        left = self.by_client.get(client, 0) - n
        if left > 0:
            self.by_client[client] = left
        else:
            self.by_client.pop(client, None)


class RequestGuard:
    """ASGI middleware: request id, then key, Content-Length and in-flight checks before the app reads the body.

    While the body is read, every chunk is counted against the UploadBudget and must come within
    the idle timeout of the last one and within the body deadline of the request's start; a body
    that misses either is answered 408 and its connection closed.
    """

    def __init__(
        self, app: ASGIApp, settings: ServeSettings, budget: UploadBudget | None = None, metrics: Any = None
    ) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics
        self.budget = budget or UploadBudget(int(settings.max_inflight_mb * 1_000_000), settings.max_client_share)

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
        start = time.monotonic()
        status = {"code": 500}
        send = _with_request_id(send, rid, status)
        try:
            await self._checked(scope, receive, send)
        finally:
            if self.metrics is not None:
                self.metrics.observe(scope, status["code"], time.monotonic() - start)

    async def _checked(self, scope: Scope, receive: Receive, send: Send) -> None:
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
        admission = getattr(self.metrics, "admission", None)
        work = ADMITTED_FIRST.get(scope["path"].rstrip("/"))
        refused = None if admission is None or work is None else admission.refusal(work)
        if refused is not None:
            headers = {"retry-after": str(refused.retry_after), "connection": "close"}
            await reply(send, 503, str(refused), headers)  # the route admits for real; this only spares the body
            return
        await self._guarded(scope, receive, send, limit, kind)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, limit: int, kind: str) -> None:
        """Run the app, counting and timing the body as it arrives; cut it off with a 413, 503 or 408."""
        client = str((scope.get("client") or ("-", 0))[0])
        s, budget = self.settings, self.budget
        begun = time.monotonic()
        body: dict[str, Any] = {"got": 0, "done": False, "cut": None, "started": False}

        async def counted() -> Message:
            if body["cut"] is not None:
                return {"type": "http.disconnect"}
            if body["done"]:
                return await receive()  # the body is in: the app only listens for a disconnect
            wait = min(s.body_idle_timeout_s, s.body_deadline_s - (time.monotonic() - begun))
            try:
                message = await asyncio.wait_for(receive(), max(wait, 0.0))
            except asyncio.TimeoutError:
                body["cut"] = (408, self._late_message(begun), {"connection": "close"})
                return {"type": "http.disconnect"}
            if message["type"] != "http.request":
                return message
            chunk = len(message.get("body", b""))
            body["done"] = not message.get("more_body", False)
            if body["got"] + chunk > limit:
                got = body["got"] + chunk
                text = size_message("the request body", got, kind, limit - _slack(kind)).replace(
                    " is ", " is at least ", 1
                )
                body["cut"] = (413, text, {"connection": "close"})  # the rest was never read
                return {"type": "http.disconnect"}
            refused = budget.take(client, body["got"], chunk)
            if refused is not None:
                body["cut"] = (503, refused, {"retry-after": "1", "connection": "close"})
                return {"type": "http.disconnect"}
            body["got"] += chunk
            return message

        async def guarded_send(message: Message) -> None:
            if body["cut"] is not None:
                return  # whatever the app answers to the cut-off body, the client gets the answer below
            body["started"] = True
            await send(message)

        budget.receiving += 1
        try:
            try:
                await self.app(scope, counted, guarded_send)
            except Exception:
                if body["cut"] is None:
                    raise
            if body["cut"] is not None and not body["started"]:
                status, text, headers = body["cut"]
                await reply(send, status, text, headers)
        finally:
            budget.receiving -= 1
            budget.give(client, body["got"])

    def _late_message(self, begun: float) -> str:
        s, took = self.settings, time.monotonic() - begun
        if took >= s.body_deadline_s - 0.01:
            return f"request body not received within {s.body_deadline_s:g} s (body-deadline-s); connection closed"
        return f"request body stalled: no data for {s.body_idle_timeout_s:g} s (body-idle-timeout-s); connection closed"


def _slack(kind: str) -> int:
    return MULTIPART_SLACK if kind == "upload" else 0


def _with_request_id(send: Send, rid: str, status: dict[str, int]) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            status["code"] = int(message["status"])
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
