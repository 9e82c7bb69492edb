"""inference.GRPCInferenceService (the Open Inference Protocol over gRPC) on the server's gRPC port.

Each RPC translates its message to the shared paths (ClassifyService, AdapterService, oip.py) and back;
errors are domain exceptions, mapped to status codes by the server's interceptor like every other
RPC. ModelStreamInfer answers each request on the stream in order; a request that fails is answered
with its error_message and the stream goes on (Triton's behaviour).

The generated module registers the protobuf package `inference`, as tritonclient's does: one process
cannot import both (protobuf refuses duplicate symbols), which is why only this module imports it.
"""
from __future__ import annotations

import time
from typing import Optional

from google.protobuf import json_format

from adapterserve.runtime.errors import (AdapterServeError, InvalidInputError, UnauthenticatedError,
                                         UnavailableError)
from adapterserve.runtime.server import oip, oip_repository
from adapterserve.runtime.server.auth import token_problem
from adapterserve.runtime.server.classify import ClassifyService, answer_in_order
from adapterserve.runtime.server.grpc_service import AdapterService
from adapterserve.v1 import inference_pb2 as ip
from adapterserve.v1 import inference_pb2_grpc as ip_grpc

SERVICE = "inference.GRPCInferenceService"


def parameter_value(p):
    """An InferParameter / ModelRepositoryParameter as a Python value."""
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def _infer_call(request: ip.ModelInferRequest) -> oip.InferCall:
    parameters = {k: parameter_value(v) for k, v in request.parameters.items()}
    top_k, truncate, timeout_s = oip.read_parameters(parameters)
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInputError(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; send "
                                "one per input, in the order of inputs")
    tensors = {}
    for i, tensor in enumerate(request.inputs):
        if tensor.name in tensors:
            raise InvalidInputError(f"input {tensor.name} is given twice")
        if raw:
            if tensor.HasField("contents") and tensor.contents.ByteSize():
                raise InvalidInputError(f"input {tensor.name} has contents and raw_input_contents; send one")
            elements = oip.decode_raw_bytes(raw[i], tensor.name) if tensor.datatype == oip.BYTES else []
        else:
            elements = list(tensor.contents.bytes_contents)
        tensors[tensor.name] = oip.texts_of(tensor.name, tensor.datatype, tensor.shape, elements)
    texts, pairs = oip.collect_inputs(tensors)
    outputs = []
    for o in request.outputs:
        params = {k: parameter_value(v) for k, v in o.parameters.items()}
        k = oip.int_parameter("classification", params["classification"]) if "classification" in params else 0
        outputs.append(oip.RequestedOutput(o.name, classification=k))
    return oip.InferCall(task=request.model_name, version=request.model_version, request_id=request.id,
                         texts=texts, pairs=pairs, top_k=top_k, truncate=truncate, timeout_s=timeout_s,
                         outputs=oip.check_outputs(outputs))


def _infer_response(call: oip.InferCall, result) -> ip.ModelInferResponse:
    response = ip.ModelInferResponse(model_name=call.task, model_version=result.adapter_version, id=call.request_id)
    for tensor in oip.output_tensors(call, result):
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        response.raw_output_contents.append(tensor.raw())
    response.parameters["queue_ns"].int64_param = result.queue_ns
    response.parameters["tokenize_ns"].int64_param = result.tokenize_ns
    response.parameters["inference_ns"].int64_param = result.inference_ns
    response.parameters["total_ns"].int64_param = result.total_ns
    return response


class InferenceServicer(ip_grpc.GRPCInferenceServiceServicer):
    def __init__(self, classify: ClassifyService, admin_token: Optional[str]) -> None:
        self.classify = classify
        self.admin_token = admin_token
        self.adapters: Optional[AdapterService] = None
        self.live = True

    def attach(self, adapters: AdapterService) -> None:
        self.adapters = adapters

    def _entry(self, name: str, version: str):
        self.classify.check_ready()
        return oip_repository.require_model(self.adapters, name, version)

    async def ServerLive(self, request, context):
        return ip.ServerLiveResponse(live=self.live)

    async def ServerReady(self, request, context):
        return ip.ServerReadyResponse(ready=self.classify.ready and self.adapters is not None)

    async def ServerMetadata(self, request, context):
        return ip.ServerMetadataResponse(**oip.server_metadata())

    async def ModelReady(self, request, context):
        if not self.classify.ready:
            return ip.ModelReadyResponse(ready=False)
        self._entry(request.name, request.version)  # NOT_FOUND for an unknown model or version
        return ip.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request, context):
        entry = self._entry(request.name, request.version)
        return ip.ModelMetadataResponse(**oip.model_metadata(entry.task, entry.version, entry.spec.labels))

    async def ModelConfig(self, request, context):
        entry = self._entry(request.name, request.version)
        config = oip.model_config(entry.task, entry.spec.labels, self.classify.config.max_texts_per_request,
                                  entry.spec.peft_type, entry.spec.rank)
        return json_format.ParseDict({"config": config}, ip.ModelConfigResponse())

    async def ModelStatistics(self, request, context):
        self.classify.check_ready()
        if request.name:
            entries = [self._entry(request.name, request.version)]
        else:
            entries = self.classify.runtime.registry.entries()
        return json_format.ParseDict(oip.model_statistics(entries, self.classify.statistics), ip.ModelStatisticsResponse())

    async def _infer(self, request, context, stream: bool = False) -> ip.ModelInferResponse:
        call = _infer_call(request)
        remaining = context.time_remaining()
        if call.timeout_s is not None:
            remaining = call.timeout_s if remaining is None else min(remaining, call.timeout_s)
        result = await self.classify.classify(call.task, call.texts, call.pairs, call.truncate, peer=context.peer(),
                                              remaining=remaining, stream=stream, version=call.version)
        return _infer_response(call, result)

    async def ModelInfer(self, request, context):
        return await self._infer(request, context)

    async def ModelStreamInfer(self, request_iterator, context):
        async def answer(request):
            try:
                return ip.ModelStreamInferResponse(infer_response=await self._infer(request, context, stream=True))
            except AdapterServeError as e:  # answered in the stream; the stream goes on
                return ip.ModelStreamInferResponse(error_message=str(e))

        async for response in answer_in_order(request_iterator, answer, self.classify.config.max_stream_inflight):
            yield response

    def _authorize_admin(self, context) -> None:
        if self.adapters is None:
            raise UnavailableError("the base model is still loading; retry when health reports SERVING")
        if self.admin_token:
            # The interceptor refused bad tokens before the body was read; checked again here.
            problem = token_problem(context.invocation_metadata(), self.admin_token)
            if problem is not None:
                raise UnauthenticatedError(problem)

    async def RepositoryIndex(self, request, context):
        self._authorize_admin(context)
        models = oip_repository.index(self.adapters, request.ready)
        return ip.RepositoryIndexResponse(models=[ip.RepositoryIndexResponse.ModelIndex(**m) for m in models])

    async def RepositoryModelLoad(self, request, context):
        self._authorize_admin(context)
        parameters = {k: parameter_value(v) for k, v in request.parameters.items()}
        remaining = context.time_remaining()
        await oip_repository.load(self.adapters, request.model_name, parameters,
                                  time.monotonic() + remaining if remaining is not None else None)
        return ip.RepositoryModelLoadResponse()

    async def RepositoryModelUnload(self, request, context):
        self._authorize_admin(context)
        await oip_repository.unload(self.adapters, request.model_name)
        return ip.RepositoryModelUnloadResponse()
