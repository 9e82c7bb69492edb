"""Calls are authenticated from their metadata before their message is read.

With --admin-token, a call to adapterserve.v1.AdapterRegistry without `authorization: Bearer <admin
token>` is answered UNAUTHENTICATED by a handler that never reads the request: an unauthenticated
client cannot make the server receive and parse a 64 MB upload. With --classify-token the same holds
for adapterserve.v1.Classifier (the admin token is accepted there too). The Open Inference Protocol
service follows the same split: its Repository* calls need the admin token, its Model* calls (infer,
metadata, statistics) the classify token; ServerLive/Ready/Metadata stay open, like health and
reflection. Tokens are compared in constant time.
"""
from __future__ import annotations

import hmac
from typing import Optional

import grpc

from adapterserve.runtime.errors import UnauthenticatedError

REGISTRY_SERVICE = "adapterserve.v1.AdapterRegistry"
CLASSIFIER_SERVICE = "adapterserve.v1.Classifier"
OIP_SERVICE = "inference.GRPCInferenceService"


def token_problem(metadata, *tokens: Optional[str]) -> Optional[str]:
    """Why these call metadata carry none of the accepted tokens (None: they carry one)."""
    header = dict(metadata or ()).get("authorization", "")
    if not header:
        return "this call needs 'authorization: Bearer <token>' metadata"
    # Every accepted token is compared, so the time taken does not tell which one nearly matched.
    matches = [hmac.compare_digest(header.encode(), f"Bearer {t}".encode()) for t in tokens if t]
    return None if any(matches) else "the token in 'authorization' metadata is wrong"


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, admin_token: Optional[str], classify_token: Optional[str] = None, metrics=None) -> None:
        self.accepted = {}
        if admin_token:
            self.accepted[f"/{REGISTRY_SERVICE}/"] = (admin_token,)
            self.accepted[f"/{OIP_SERVICE}/Repository"] = (admin_token,)
        if classify_token:
            self.accepted[f"/{CLASSIFIER_SERVICE}/"] = (classify_token, admin_token)
            self.accepted[f"/{OIP_SERVICE}/Model"] = (classify_token, admin_token)
        self.metrics = metrics  # RequestMetrics: refused calls are counted like any other

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        tokens = next((t for prefix, t in self.accepted.items() if method.startswith(prefix)), None)
        if tokens is None:
            return await continuation(handler_call_details)
        problem = token_problem(handler_call_details.invocation_metadata, *tokens)
        if problem is None:
            return await continuation(handler_call_details)
        metrics = self.metrics

        async def refuse(request_iterator, context):  # the request iterator is never read
            if metrics is not None:
                metrics.started(method)
                metrics.finished(method, "UNAUTHENTICATED", 0.0, UnauthenticatedError(problem))
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

        # stream-unary on the server side: gRPC hands over no message until the handler asks for one.
        return grpc.stream_unary_rpc_method_handler(refuse)
