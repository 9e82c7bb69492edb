"""Calls between cluster deployments, with our errors kept and replica failures made UNAVAILABLE.

A domain error in a replica (unknown task, bad adapter, full queue) is returned, not raised (Ray
would log each one with a traceback and ship the traceback back; see `returns_errors`), and
forward() raises it in the caller as itself, so the front ends map it to the same status code as on
a single server. A replica that dies
or becomes unreachable mid-call is retried on another one for calls that are safe to repeat
(classify, validate); past the retries, or for calls that are not, the caller gets UNAVAILABLE:
never INTERNAL and never a wrong answer.
"""
from __future__ import annotations

import asyncio
import contextvars
from typing import Any, Callable, Optional

from adapterserve.runtime.errors import AdapterServeError, ResourceExhaustedError, UnavailableError

RETRIES = 3


def returns_errors(method):
    """Decorate a deployment method: our domain errors become its return value (forward raises them)."""
    import functools

    @functools.wraps(method)
    async def wrapper(*args, **kwargs):
        try:
            return await method(*args, **kwargs)
        except AdapterServeError as e:
            return e

    return wrapper


def _replica_lost(error: BaseException) -> bool:
    import grpc
    from ray import exceptions as ray_errors
    from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError

    if isinstance(error, grpc.aio.AioRpcError):
        # Serve's gRPC transport: the replica answers its own failures inside a response, so a status
        # here is the channel's (Serve maps UNAVAILABLE itself; a connection reset mid-call is these).
        return error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                                grpc.StatusCode.ABORTED)
    return isinstance(error, (ray_errors.RayActorError, ray_errors.ActorUnavailableError,
                              ray_errors.ActorUnschedulableError, ReplicaUnavailableError,
                              DeploymentUnavailableError))


def unwrap(error: BaseException) -> BaseException:
    """The error to raise for a failed call: our own, UNAVAILABLE for a lost replica, else as it is."""
    from ray import exceptions as ray_errors
    from ray.serve.exceptions import BackPressureError

    cause = error
    while isinstance(cause, ray_errors.RayTaskError) and cause.cause is not None and cause.cause is not cause:
        cause = cause.cause
    if isinstance(cause, AdapterServeError):
        return cause
    if isinstance(cause, BackPressureError):
        return ResourceExhaustedError("every replica's queue is full; retry later or add replicas",
                                      reason="replicas_busy")
    if _replica_lost(cause):
        return UnavailableError(f"the replica serving this call was lost ({type(cause).__name__}); retry")
    return error


def call(method, *args, **kwargs):
    """method.remote(*args, **kwargs), made in an empty context. Our front ends and loops are not Serve
    requests, but their tasks inherit whatever Serve request context was current where they started;
    a handle call stamps its request with that context's internal id, which Serve's router uses to hand
    the replica it chose for a request to that request (and the affinity router keys its decisions on).
    Calls sharing an id could take each other's replicas. An empty context gives each call its own."""
    return contextvars.Context().run(method.remote, *args, **kwargs)


async def forward(method, *args, idempotent: bool = True, on_retry: Optional[Callable[[], None]] = None,
                  **kwargs) -> Any:
    """Await method.remote(*args, **kwargs) on a deployment handle. idempotent: a call lost with its
    replica is sent again (the router then picks a live replica)."""
    attempt = 0
    while True:
        try:
            result = await call(method, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - sorted out by unwrap
            error = unwrap(e)
            if isinstance(error, UnavailableError) and idempotent and attempt < RETRIES:
                attempt += 1
                if on_retry is not None:
                    on_retry()
                await asyncio.sleep(0.1 * attempt)
                continue
            if error is e:
                raise
            raise error from None
        if isinstance(result, AdapterServeError):
            raise result
        return result
