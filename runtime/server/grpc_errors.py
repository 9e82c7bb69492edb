"""The one place domain errors become status codes: gRPC's (the interceptor) and HTTP's (the Open
Inference Protocol's REST front end, which answers {"error": message} with http_status_of(error))."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc

from adapterserve.runtime.errors import AdapterServeError

log = logging.getLogger(__name__)


def status_of(error: AdapterServeError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.grpc_code)


# gRPC code -> HTTP status, as the protocol's REST binding and Triton use them. A full queue or a
# client over its share is 429 (retry later); an upload over the size limit is 413.
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409, "RESOURCE_EXHAUSTED": 429, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403,
    "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504, "UNIMPLEMENTED": 501, "CANCELLED": 499, "INTERNAL": 500,
}
TOO_LARGE_REASONS = ("adapter_too_large", "body_too_large")


def http_status_of(error: AdapterServeError) -> int:
    if error.reason in TOO_LARGE_REASONS:
        return 413
    return HTTP_STATUS.get(error.grpc_code, 500)


class RequestMetrics:
    """Every RPC's final status and duration, counted where the status is decided."""

    def __init__(self, registry) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        from adapterserve.runtime.server.metrics import LATENCY_BUCKETS, PREFIX

        self.requests = Counter(f"{PREFIX}_requests_total", "RPCs by method and final gRPC status code",
                                ["rpc", "code"], registry=registry)
        self.duration = Histogram(f"{PREFIX}_request_duration_seconds", "End-to-end RPC latency in the server",
                                  ["rpc"], buckets=LATENCY_BUCKETS, registry=registry)
        self.rejected = Counter(f"{PREFIX}_rejected_requests_total",
                                "Requests refused before or instead of inference, by reason", ["reason"], registry=registry)
        self.inflight = Gauge(f"{PREFIX}_inflight_requests", "RPCs being handled now", registry=registry)

    def started(self, method: str) -> None:
        self.inflight.inc()

    def finished(self, method: str, code: str, seconds: float, error: BaseException | None) -> None:
        rpc = method.rsplit("/", 1)[-1]
        self.inflight.dec()
        self.requests.labels(rpc, code).inc()
        self.duration.labels(rpc).observe(seconds)
        if error is not None and code not in ("OK", "INTERNAL"):
            self.rejected.labels(getattr(error, "reason", code.lower())).inc()


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps our unary-unary and stream-stream handlers: AdapterServeError -> its status code and
    message; anything else -> INTERNAL with an id that is also logged with the traceback."""

    def __init__(self, metrics: RequestMetrics | None = None) -> None:
        self.metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(method, handler.stream_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler

    async def _abort(self, context, method, error: BaseException):
        if isinstance(error, AdapterServeError):
            code, message = status_of(error), str(error)
        else:
            incident = uuid.uuid4().hex[:12]
            log.error("internal error in %s (incident %s)", method, incident, exc_info=error)
            code, message = grpc.StatusCode.INTERNAL, f"internal error (incident {incident}); see server log"
        await context.abort(code, message)

    # Metrics are recorded before the status leaves (abort/return), so a client that has its answer
    # never scrapes a count that does not include it yet.
    def _finish(self, method: str, code: str, start: float, error: BaseException | None) -> None:
        if self.metrics:
            self.metrics.finished(method, code, time.perf_counter() - start, error)

    def _wrap_unary(self, method, inner):
        async def behavior(request, context):
            start = time.perf_counter()
            if self.metrics:
                self.metrics.started(method)
            try:
                response = await inner(request, context)
            except grpc.aio.AbortError:
                self._finish(method, context.code().name if context.code() else "UNKNOWN", start, None)
                raise
            except asyncio.CancelledError:
                self._finish(method, "CANCELLED", start, None)
                raise
            except Exception as e:  # noqa: BLE001 - mapped to a status, never lost
                self._finish(method, self._code(e), start, e)
                await self._abort(context, method, e)
            else:
                self._finish(method, "OK", start, None)
                return response

        return behavior

    def _wrap_stream(self, method, inner):
        async def behavior(request_iterator, context):
            start = time.perf_counter()
            if self.metrics:
                self.metrics.started(method)
            try:
                async for response in inner(request_iterator, context):
                    yield response
            except grpc.aio.AbortError:
                self._finish(method, context.code().name if context.code() else "UNKNOWN", start, None)
                raise
            except (asyncio.CancelledError, GeneratorExit):
                self._finish(method, "CANCELLED", start, None)
                raise
            except Exception as e:  # noqa: BLE001
                self._finish(method, self._code(e), start, e)
                await self._abort(context, method, e)
            else:
                self._finish(method, "OK", start, None)

        return behavior

    @staticmethod
    def _code(error: BaseException) -> str:
        if isinstance(error, AdapterServeError):
            return status_of(error).name
        if isinstance(error, asyncio.CancelledError):
            return "CANCELLED"
        return "INTERNAL"
