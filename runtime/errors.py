"""Domain errors. Each maps to one gRPC status code in the server's interceptor.

Messages are written for the caller: they say what was wrong and what to change.
"""
from __future__ import annotations


class AdapterServeError(Exception):
    """Base of every error we raise on purpose."""

    # Name of the grpc.StatusCode member this error maps to; read by the interceptor.
    grpc_code = "INTERNAL"

    def __init__(self, message: str = "", reason: str = "") -> None:
        super().__init__(message)
        # Short machine-readable cause for the rejected_requests_total{reason} metric.
        self.reason = reason or self.grpc_code.lower()

    def __reduce__(self):
        # Errors cross process boundaries (cluster replicas answer through Ray): keep class, message and reason.
        return _rebuild, (type(self), str(self), self.reason)


def _rebuild(cls, message: str, reason: str) -> AdapterServeError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.reason = reason
    return error


class InvalidInputError(AdapterServeError):
    """The request itself is malformed (empty texts, too long, mismatched pairs...)."""

    grpc_code = "INVALID_ARGUMENT"


class InvalidAdapterError(AdapterServeError):
    """An adapter's files are unreadable, unsupported or inconsistent in themselves."""

    grpc_code = "INVALID_ARGUMENT"


class UnsupportedAdapterTypeError(InvalidAdapterError):
    """A PEFT type (prefix tuning, DoRA, ...) this runtime does not serve yet."""


class BaseMismatchError(AdapterServeError):
    """The adapter is well-formed but was made for a different base model."""

    grpc_code = "FAILED_PRECONDITION"


class UnknownTaskError(AdapterServeError):
    grpc_code = "NOT_FOUND"


class TaskExistsError(AdapterServeError):
    grpc_code = "ALREADY_EXISTS"


class ResourceExhaustedError(AdapterServeError):
    """Queue full, slots exhausted, payload too large."""

    grpc_code = "RESOURCE_EXHAUSTED"


class PermissionDeniedError(AdapterServeError):
    grpc_code = "PERMISSION_DENIED"


class UnauthenticatedError(AdapterServeError):
    grpc_code = "UNAUTHENTICATED"


class StoreFullError(ResourceExhaustedError):
    """The data dir's disk is full: the change was not made (nothing half-done)."""

    def __init__(self, message: str = "") -> None:
        super().__init__(message, reason="data_dir_full")


class StoreUnavailableError(AdapterServeError):
    """The data dir cannot be written (read-only, I/O error): the change was not made."""

    grpc_code = "UNAVAILABLE"


class QuarantinedTaskError(AdapterServeError):
    """A task in the data dir whose files are damaged: not served until registered again."""

    grpc_code = "FAILED_PRECONDITION"


class DeadlineExceededError(AdapterServeError):
    grpc_code = "DEADLINE_EXCEEDED"


class UnavailableError(AdapterServeError):
    grpc_code = "UNAVAILABLE"


class ConfigError(AdapterServeError):
    """A configuration value is out of range or contradicts another one."""

    grpc_code = "FAILED_PRECONDITION"


class NotSupportedError(AdapterServeError):
    """A feature that exists in the design but is refused in this combination (e.g. merge on int8)."""

    grpc_code = "FAILED_PRECONDITION"
