"""The one place domain errors become gRPC status codes."""
from __future__ import annotations

import logging
import uuid

import grpc

from runtime.errors import AdapterServeError

log = logging.getLogger(__name__)


def status_of(error: AdapterServeError) -> grpc.StatusCode:
    return getattr(grpc.StatusCode, error.grpc_code)


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Wraps our unary-unary and stream-stream handlers: AdapterServeError -> its status code and
    message; anything else -> INTERNAL with an id that is also logged with the traceback."""

    def __init__(self, on_result=None) -> None:
        # on_result(method, code_name, seconds) lets metrics count every RPC by final status.
        self.on_result = on_result

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

    def _wrap_unary(self, method, inner):
        import time

        async def behavior(request, context):
            start = time.perf_counter()
            code = "OK"
            try:
                return await inner(request, context)
            except (AdapterServeError, Exception) as e:
                if isinstance(e, grpc.aio.AbortError):
                    code = context.code().name if context.code() else "UNKNOWN"
                    raise
                code = status_of(e).name if isinstance(e, AdapterServeError) else "INTERNAL"
                await self._abort(context, method, e)
            finally:
                if self.on_result:
                    self.on_result(method, code, time.perf_counter() - start)

        return behavior

    def _wrap_stream(self, method, inner):
        import time

        async def behavior(request_iterator, context):
            start = time.perf_counter()
            code = "OK"
            try:
                async for response in inner(request_iterator, context):
                    yield response
            except (AdapterServeError, Exception) as e:
                if isinstance(e, grpc.aio.AbortError):
                    raise
                code = status_of(e).name if isinstance(e, AdapterServeError) else "INTERNAL"
                await self._abort(context, method, e)
            finally:
                if self.on_result:
                    self.on_result(method, code, time.perf_counter() - start)

        return behavior
