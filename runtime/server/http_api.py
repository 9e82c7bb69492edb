"""The Open Inference Protocol (KServe v2) over HTTP/REST, with Triton's binary tensor extension: a
Starlette app served by uvicorn on the gRPC server's event loop (--http-port; 0 disables it).

Every endpoint translates to the shared paths (ClassifyService, AdapterService, oip.py): an HTTP
inference joins the same batcher, admission shares, deadlines, drain and metrics as a gRPC one
(requests_total{rpc="http:ModelInfer"}). Errors are {"error": "..."} with http_status_of(error).
Tokens are checked from the headers before the body is read, as on gRPC: the repository endpoints
need the admin token, inference and model endpoints the classify token (when set); health and
server metadata stay open.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import socket
import time
import uuid
import zlib
from typing import Awaitable, Callable, Optional

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from adapterserve.runtime.errors import (AdapterServeError, InvalidInputError, ResourceExhaustedError,
                                         UnauthenticatedError, UnavailableError)
from adapterserve.runtime.server import oip, oip_repository
from adapterserve.runtime.server.auth import token_problem
from adapterserve.runtime.server.classify import ClassifyService
from adapterserve.runtime.server.grpc_errors import RequestMetrics, http_status_of
from adapterserve.runtime.server.grpc_service import AdapterService

log = logging.getLogger(__name__)

HEADER_LENGTH = "inference-header-content-length"
OPEN, CLASSIFY, ADMIN = "open", "classify", "admin"


def _flatten(data) -> list:
    if isinstance(data, list) and data and isinstance(data[0], list):
        return [x for part in data for x in _flatten(part)]
    return data


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    if not encoding or encoding == "identity":
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise InvalidInputError(f"Content-Encoding {encoding!r} is not accepted; send gzip, deflate or none")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise InvalidInputError(f"the body is not valid {encoding} ({e})") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise ResourceExhaustedError(f"the decompressed body is over {limit} bytes", reason="body_too_large")
    return out


def _infer_call(task: str, version: str, header: dict, binary: bytes) -> tuple[oip.InferCall, bool]:
    """The call a JSON inference request (plus its binary tail) stands for, and whether outputs are
    binary by default."""
    if not isinstance(header, dict):
        raise InvalidInputError("the inference request must be a JSON object with an inputs list")
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInputError("parameters must be a JSON object")
    top_k, truncate, timeout_s = oip.read_parameters(parameters)
    inputs = header.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidInputError("inputs must be a list of tensors, e.g. [{\"name\": \"TEXT\", \"datatype\": \"BYTES\", "
                                "\"shape\": [1], \"data\": [\"some text\"]}]")
    tensors, offset = {}, 0
    for t in inputs:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise InvalidInputError("each input needs a name, a datatype, a shape and data")
        name, shape = t["name"], t.get("shape")
        if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
            raise InvalidInputError(f"input {name}: shape must be a list of integers")
        if name in tensors:
            raise InvalidInputError(f"input {name} is given twice")
        oip.check_datatype(name, t.get("datatype", ""))
        size = (t.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            size = oip.int_parameter("binary_data_size", size)
            if offset + size > len(binary):
                raise InvalidInputError(f"input {name}: binary_data_size {size} runs past the body's binary part "
                                        f"({len(binary) - offset} bytes left)")
            chunk, offset = binary[offset:offset + size], offset + size
            elements = oip.decode_raw_bytes(chunk, name)
        else:
            data = t.get("data")
            if not isinstance(data, list):
                raise InvalidInputError(f"input {name}: data must be a list (or use binary_data_size)")
            elements = _flatten(data)
            if not all(isinstance(e, str) for e in elements):
                raise InvalidInputError(f"input {name}: BYTES data in JSON must be strings")
        tensors[name] = oip.texts_of(name, t.get("datatype", ""), shape, elements)
    if offset != len(binary):
        raise InvalidInputError(f"the body has {len(binary) - offset} bytes after the last binary input")
    texts, pairs = oip.collect_inputs(tensors)
    outputs = []
    for o in header.get("outputs") or []:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise InvalidInputError("each requested output needs a name")
        params = o.get("parameters") or {}
        k = oip.int_parameter("classification", params["classification"]) if "classification" in params else 0
        binary_out = oip.bool_parameter("binary_data", params["binary_data"]) if "binary_data" in params else None
        outputs.append(oip.RequestedOutput(o["name"], classification=k, binary=binary_out))
    binary_default = parameters.get("binary_data_output", False) is True
    call = oip.InferCall(task=task, version=version, request_id=str(header.get("id") or ""), texts=texts, pairs=pairs,
                         top_k=top_k, truncate=truncate, timeout_s=timeout_s, outputs=oip.check_outputs(outputs))
    return call, binary_default


def _infer_response(call: oip.InferCall, result, binary_default: bool) -> Response:
    outputs, tail = [], []
    for tensor in oip.output_tensors(call, result):
        entry = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        binary = tensor.requested.binary if tensor.requested.binary is not None else binary_default
        if binary:
            raw = tensor.raw()
            entry["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        else:
            entry["data"] = tensor.as_list()
        outputs.append(entry)
    body = {"model_name": call.task, "model_version": result.adapter_version, "outputs": outputs,
            "parameters": {"queue_ns": result.queue_ns, "tokenize_ns": result.tokenize_ns,
                           "inference_ns": result.inference_ns, "total_ns": result.total_ns}}
    if call.request_id:
        body["id"] = call.request_id
    header = json.dumps(body, separators=(",", ":")).encode()
    if not tail:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(tail), media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(len(header))})


class HttpFrontEnd:
    def __init__(self, classify: ClassifyService, admin_token: Optional[str], classify_token: Optional[str],
                 body_limit: int, metrics: Optional[RequestMetrics] = None) -> None:
        self.classify = classify
        self.adapters: Optional[AdapterService] = None
        self.tokens = {ADMIN: (admin_token,) if admin_token else (),
                       CLASSIFY: (classify_token, admin_token) if classify_token else ()}
        self.body_limit = body_limit
        self.metrics = metrics
        self.server: Optional[uvicorn.Server] = None
        self._socket: Optional[socket.socket] = None
        self._serving = None
        m = "/v2/models/{model}"
        v = "/v2/models/{model}/versions/{version}"
        routes = [
            ("/v2/health/live", "GET", "ServerLive", OPEN, self.live),
            ("/v2/health/ready", "GET", "ServerReady", OPEN, self.ready),
            ("/v2", "GET", "ServerMetadata", OPEN, self.server_metadata),
            ("/v2/models/stats", "GET", "ModelStatistics", CLASSIFY, self.statistics),
            ("/v2/repository/index", "POST", "RepositoryIndex", ADMIN, self.repository_index),
            ("/v2/repository/models/{model}/load", "POST", "RepositoryModelLoad", ADMIN, self.load),
            ("/v2/repository/models/{model}/unload", "POST", "RepositoryModelUnload", ADMIN, self.unload),
        ]
        for prefix in (m, v):
            routes += [
                (prefix, "GET", "ModelMetadata", CLASSIFY, self.model_metadata),
                (prefix + "/ready", "GET", "ModelReady", CLASSIFY, self.model_ready),
                (prefix + "/config", "GET", "ModelConfig", CLASSIFY, self.model_config),
                (prefix + "/stats", "GET", "ModelStatistics", CLASSIFY, self.statistics),
                (prefix + "/infer", "POST", "ModelInfer", CLASSIFY, self.infer),
            ]
        self.app = Starlette(routes=[Route(path, self._endpoint(name, access, handler), methods=[method])
                                     for path, method, name, access, handler in routes])

    def attach(self, adapters: AdapterService) -> None:
        self.adapters = adapters

    # ---- plumbing -------------------------------------------------------------------------------

    def _endpoint(self, name: str, access: str, handler: Callable[[Request], Awaitable[Response]]):
        rpc = f"http:{name}"

        async def endpoint(request: Request) -> Response:
            start = time.perf_counter()
            if self.metrics is not None:
                self.metrics.started(rpc)
            try:
                self._authorize(request, access)
                response = await handler(request)
            except AdapterServeError as e:
                code = type(e).grpc_code
                if self.metrics is not None:
                    self.metrics.finished(rpc, code, time.perf_counter() - start, e)
                headers = {"WWW-Authenticate": "Bearer"} if isinstance(e, UnauthenticatedError) else None
                return JSONResponse({"error": str(e)}, status_code=http_status_of(e), headers=headers)
            except Exception:  # noqa: BLE001 - answered, logged with an incident id
                incident = uuid.uuid4().hex[:12]
                log.exception("internal error in %s (incident %s)", rpc, incident)
                if self.metrics is not None:
                    self.metrics.finished(rpc, "INTERNAL", time.perf_counter() - start, None)
                return JSONResponse({"error": f"internal error (incident {incident}); see server log"}, status_code=500)
            if self.metrics is not None:
                self.metrics.finished(rpc, "OK", time.perf_counter() - start, None)
            return response

        return endpoint

    def _authorize(self, request: Request, access: str) -> None:
        tokens = self.tokens.get(access)
        if tokens:
            problem = token_problem([("authorization", request.headers.get("authorization", ""))], *tokens)
            if problem is not None:
                raise UnauthenticatedError(problem.replace("metadata", "header"))

    def _require_adapters(self) -> AdapterService:
        self.classify.check_ready()
        if self.adapters is None:
            raise UnavailableError("the base model is still loading; retry when /v2/health/ready says 200")
        return self.adapters

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.body_limit:
            raise ResourceExhaustedError(f"the body is {declared} bytes, over the limit of {self.body_limit}",
                                         reason="body_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.body_limit:
                raise ResourceExhaustedError(f"the body is over the limit of {self.body_limit} bytes",
                                             reason="body_too_large")
            chunks.append(chunk)
        return _decompress(b"".join(chunks), request.headers.get("content-encoding", "").strip().lower(),
                           self.body_limit)

    async def _json(self, request: Request, allow_empty: bool = False):
        body = await self._body(request)
        if not body.strip() and allow_empty:
            return {}
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidInputError(f"the body is not JSON ({e})") from None

    def _entry(self, request: Request):
        adapters = self._require_adapters()
        return oip_repository.require_model(adapters, request.path_params["model"], request.path_params.get("version", ""))

    # ---- endpoints ------------------------------------------------------------------------------

    async def live(self, request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(self, request: Request) -> Response:
        ready = self.classify.ready and self.adapters is not None
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    async def server_metadata(self, request: Request) -> Response:
        return JSONResponse(oip.server_metadata())

    async def model_metadata(self, request: Request) -> Response:
        entry = self._entry(request)
        return JSONResponse(oip.model_metadata(entry.task, entry.version, entry.spec.labels))

    async def model_ready(self, request: Request) -> Response:
        entry = self._entry(request)
        if not self.classify.ready:
            raise UnavailableError("the server is draining; retry on another replica", reason="draining")
        return JSONResponse({"name": entry.task, "ready": True})

    async def model_config(self, request: Request) -> Response:
        entry = self._entry(request)
        return JSONResponse(oip.model_config(entry.task, entry.spec.labels, self.classify.config.max_texts_per_request,
                                             entry.spec.peft_type, entry.spec.rank))

    async def statistics(self, request: Request) -> Response:
        adapters = self._require_adapters()
        entries = [self._entry(request)] if "model" in request.path_params else adapters.runtime.registry.entries()
        return JSONResponse(oip.model_statistics(entries, self.classify.statistics))

    async def infer(self, request: Request) -> Response:
        self.classify.check_ready()
        body = await self._body(request)
        length = request.headers.get(HEADER_LENGTH)
        if length is not None:
            if not length.isdigit() or int(length) > len(body):
                raise InvalidInputError(f"Inference-Header-Content-Length {length!r} is not a length within the "
                                        f"body of {len(body)} bytes")
            header_bytes, binary = body[:int(length)], body[int(length):]
        else:
            header_bytes, binary = body, b""
        try:
            header = json.loads(header_bytes)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidInputError(f"the inference request is not JSON ({e})") from None
        call, binary_default = _infer_call(request.path_params["model"], request.path_params.get("version", ""),
                                           header, binary)
        client = request.client
        peer = f"http:{client.host}:{client.port}" if client else "http"
        result = await self.classify.classify(call.task, call.texts, call.pairs, call.truncate, peer=peer,
                                              remaining=call.timeout_s, version=call.version)
        return _infer_response(call, result, binary_default)

    async def repository_index(self, request: Request) -> Response:
        adapters = self._require_adapters()
        body = await self._json(request, allow_empty=True)
        ready = bool(body.get("ready", False)) if isinstance(body, dict) else False
        return JSONResponse(oip_repository.index(adapters, ready))

    async def load(self, request: Request) -> Response:
        adapters = self._require_adapters()
        body = await self._json(request, allow_empty=True)
        if not isinstance(body, dict):
            raise InvalidInputError("the load request must be a JSON object (parameters optional)")
        parameters = dict(body.get("parameters") or {})
        for name, value in list(parameters.items()):
            if name.startswith("file:"):
                try:
                    parameters[name] = base64.b64decode(value, validate=True)
                except (binascii.Error, TypeError, ValueError):
                    raise InvalidInputError(f"parameter {name} must be the file's bytes in base64") from None
            elif name == "config" and isinstance(value, dict):
                parameters[name] = json.dumps(value)
        await oip_repository.load(adapters, request.path_params["model"], parameters, None)
        return Response(status_code=200)

    async def unload(self, request: Request) -> Response:
        adapters = self._require_adapters()
        await self._json(request, allow_empty=True)
        await oip_repository.unload(adapters, request.path_params["model"])
        return Response(status_code=200)

    # ---- serving --------------------------------------------------------------------------------

    def bind(self, host: str, port: int, ssl_certfile: Optional[str] = None, ssl_keyfile: Optional[str] = None) -> int:
        """Bind the port now (a mistake is found before the model loads); serving starts with start()."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
        # without it a keep-alive client waits out delayed ACKs (~40 ms per request).
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.bind((host, port))
            sock.listen(2048)
        except OSError:
            sock.close()
            raise
        self._socket = sock
        config = uvicorn.Config(self.app, lifespan="off", log_level="warning", access_log=False,
                                ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile, timeout_graceful_shutdown=None)
        self.server = _EmbeddedServer(config)
        return self._socket.getsockname()[1]

    async def start(self) -> None:
        self._serving = asyncio.ensure_future(self.server.serve(sockets=[self._socket]))
        while not self.server.started:
            if self._serving.done():
                self._serving.result()  # raises what stopped it
            await asyncio.sleep(0.01)

    async def stop(self, timeout: float) -> None:
        """Stop accepting, let requests in flight finish within `timeout`, then close."""
        if self._serving is None:
            if self._socket is not None:
                with contextlib.suppress(OSError):
                    self._socket.close()
            return
        self.server.config.timeout_graceful_shutdown = max(0.0, timeout)
        self.server.should_exit = True
        try:
            await asyncio.wait_for(self._serving, timeout + 1.0)
        except asyncio.TimeoutError:
            self.server.force_exit = True


class _EmbeddedServer(uvicorn.Server):
    """uvicorn on a loop it does not own: the application handles SIGTERM/SIGINT (and drains)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield
