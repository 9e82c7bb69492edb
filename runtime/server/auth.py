"""Registry calls are authenticated from their metadata before their message is read.

With --admin-token, a call to adapterserve.v1.AdapterRegistry without the right `authorization:
Bearer <token>` metadata is answered UNAUTHENTICATED by a handler that never reads the request: an
unauthenticated client cannot make the server receive and parse a 64 MB upload. Tokens are compared
in constant time.
"""
from __future__ import annotations

import hmac
import time
from typing import Optional

import grpc

from adapterserve.runtime.errors import UnauthenticatedError

REGISTRY_SERVICE = "adapterserve.v1.AdapterRegistry"


def token_problem(metadata, token: str) -> Optional[str]:
    """Why these call metadata do not carry the admin token (None: they do)."""
    header = dict(metadata or ()).get("authorization", "")
    if not header:
        return "registry calls need 'authorization: Bearer <admin token>' metadata"
    if not hmac.compare_digest(header.encode(), f"Bearer {token}".encode()):
        return "the admin token in 'authorization' metadata is wrong"
    return None


class AdminAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: Optional[str], metrics=None) -> None:
        self.token = token
        self.metrics = metrics  # RequestMetrics: refused calls are counted like any other

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if not self.token or not method.startswith(f"/{REGISTRY_SERVICE}/"):
            return await continuation(handler_call_details)
        problem = token_problem(handler_call_details.invocation_metadata, self.token)
        if problem is None:
            return await continuation(handler_call_details)
        metrics = self.metrics

        async def refuse(request_iterator, context):  # the request iterator is never read
            start = time.perf_counter()
            if metrics is not None:
                metrics.started(method)
                metrics.finished(method, "UNAUTHENTICATED", time.perf_counter() - start, UnauthenticatedError(problem))
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

        # stream-unary on the server side: gRPC hands over no message until the handler asks for one.
        return grpc.stream_unary_rpc_method_handler(refuse)
