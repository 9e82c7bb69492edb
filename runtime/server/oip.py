"""The Open Inference Protocol (KServe v2) mapping, independent of transport: what a task looks like as a
model, how an inference request's tensors become texts, and how predictions become output tensors.
oip_grpc.py and http_api.py only move these values on and off their wire.

Model name = task; model version = the task's adapter version (sha256 of its files).
Inputs:  TEXT BYTES [N] (or [N, 1]), optional TEXT_PAIR BYTES [N] for pair tasks.
Outputs: LABEL BYTES [N] (the top label; [N, k] with top_k = k > 1), SCORES FP32 [N, C] (probabilities in
         label order), LOGITS FP32 [N, C]. A request's `outputs` list selects; none listed = all three.
Request parameters: top_k (int), truncate (bool; default false: a text over the model's maximum is
refused), timeout (int, microseconds; Triton's). Output parameter `classification` = k on SCORES
returns Triton's classification strings "score:index:label" [N, k] instead of the scores.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from adapterserve import __version__
from adapterserve.runtime.errors import InvalidInputError
from adapterserve.runtime.server.classify import Classified, TaskStatistics

SERVER_NAME = "adapterserve"
PLATFORM = "adapterserve_peft"
# Extensions of Triton's that these front ends implement (ServerMetadata lists them).
EXTENSIONS = ["classification", "model_repository", "model_repository(unload_dependents)", "statistics",
              "binary_tensor_data", "parameters"]
TEXT, TEXT_PAIR = "TEXT", "TEXT_PAIR"
LABEL, SCORES, LOGITS = "LABEL", "SCORES", "LOGITS"
OUTPUTS = (LABEL, SCORES, LOGITS)
BYTES, FP32 = "BYTES", "FP32"


@dataclass
class RequestedOutput:
    name: str
    classification: int = 0  # Triton's classification extension: top-k "score:index:label" strings
    binary: Optional[bool] = None  # HTTP only: answer in the binary extension (None: the request's default)


@dataclass
class InferCall:
    """One inference request in our terms, whatever the wire."""

    task: str
    version: str
    request_id: str
    texts: list[str]
    pairs: Optional[list[str]]
    top_k: int
    truncate: bool
    timeout_s: Optional[float]
    outputs: list[RequestedOutput] = field(default_factory=list)


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: list[int]
    data: Any  # numpy float32 array (FP32) or a list of bytes (BYTES), flattened row-major
    requested: RequestedOutput

    def raw(self) -> bytes:
        """The tensor's bytes as raw_output_contents / the binary extension carry them."""
        if self.datatype == BYTES:
            return b"".join(struct.pack("<I", len(b)) + b for b in self.data)
        return np.ascontiguousarray(self.data, dtype="<f4").tobytes()

    def as_list(self) -> list:
        if self.datatype == BYTES:
            return [b.decode("utf-8") for b in self.data]
        return self.data.reshape(-1).tolist()


def decode_raw_bytes(raw: bytes, name: str) -> list[bytes]:
    """BYTES elements from their wire form: each a 4-byte little-endian length, then that many bytes."""
    out, at, size = [], 0, len(raw)
    while at < size:
        if at + 4 > size:
            raise InvalidInputError(f"input {name}: raw BYTES contents end inside an element's 4-byte length "
                                    "prefix; each element is <uint32 little-endian length><bytes>")
        (n,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + n > size:
            raise InvalidInputError(f"input {name}: raw BYTES element {len(out)} says {n} bytes but only "
                                    f"{size - at} remain; each element is <uint32 little-endian length><bytes>")
        out.append(raw[at:at + n])
        at += n
    return out


def check_datatype(name: str, datatype: str) -> None:
    if datatype != BYTES:
        raise InvalidInputError(f"input {name} has datatype {datatype or '(none)'}; it must be BYTES (UTF-8 text)")


def texts_of(name: str, datatype: str, shape: Sequence[int], elements: Sequence) -> list[str]:
    """An input tensor's elements as texts, after checking its datatype and shape."""
    check_datatype(name, datatype)
    shape = list(shape)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or any(d < 0 for d in shape):
        raise InvalidInputError(f"input {name} has shape {shape}; it must be [N] or [N, 1] (one text per row)")
    if len(elements) != shape[0]:
        raise InvalidInputError(f"input {name} has shape {shape} but carries {len(elements)} elements; send "
                                f"{shape[0]} or fix the shape")
    texts = []
    for i, element in enumerate(elements):
        if isinstance(element, str):
            texts.append(element)
            continue
        try:
            texts.append(bytes(element).decode("utf-8"))
        except UnicodeDecodeError as e:
            raise InvalidInputError(f"input {name} element {i} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    return texts


def collect_inputs(tensors: dict[str, list[str]]) -> tuple[list[str], Optional[list[str]]]:
    """texts and pairs from the named inputs, refusing names the model does not take."""
    unknown = sorted(set(tensors) - {TEXT, TEXT_PAIR})
    if unknown:
        raise InvalidInputError(f"unknown input {', '.join(unknown)}; this model takes {TEXT} (BYTES [N]) and "
                                f"optionally {TEXT_PAIR} (BYTES [N])")
    if TEXT not in tensors:
        raise InvalidInputError(f"input {TEXT} is missing; send the texts as {TEXT}, BYTES, shape [N]")
    texts, pairs = tensors[TEXT], tensors.get(TEXT_PAIR)
    if pairs is not None and len(pairs) != len(texts):
        raise InvalidInputError(f"{TEXT_PAIR} has {len(pairs)} elements but {TEXT} has {len(texts)}; send one pair per text")
    return texts, pairs


def int_parameter(name: str, value, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < low:
        raise InvalidInputError(f"parameter {name} must be an integer >= {low}; got {value!r}")
    return int(value)


def bool_parameter(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise InvalidInputError(f"parameter {name} must be a boolean; got {value!r}")
    return value


def read_parameters(parameters: dict) -> tuple[int, bool, Optional[float]]:
    """top_k, truncate, timeout (seconds) from a request's parameters; others are ignored, as the
    protocol lets a server do."""
    top_k = int_parameter("top_k", parameters["top_k"]) if "top_k" in parameters else 0
    truncate = bool_parameter("truncate", parameters["truncate"]) if "truncate" in parameters else False
    timeout = parameters.get("timeout")
    timeout_s = int_parameter("timeout", timeout) / 1e6 if timeout else None
    return top_k, truncate, timeout_s


def check_outputs(outputs: list[RequestedOutput]) -> list[RequestedOutput]:
    seen = set()
    for o in outputs:
        if o.name not in OUTPUTS:
            raise InvalidInputError(f"unknown output {o.name!r}; this model gives {', '.join(OUTPUTS)}")
        if o.name in seen:
            raise InvalidInputError(f"output {o.name} is requested twice")
        if o.classification and o.name != SCORES:
            raise InvalidInputError(f"the classification parameter applies to {SCORES}, not {o.name}")
        seen.add(o.name)
    return outputs or [RequestedOutput(name) for name in OUTPUTS]


def output_tensors(call: InferCall, result: Classified) -> list[OutputTensor]:
    n, labels = len(result.rows), result.labels
    c = len(labels)
    out = []
    for requested in call.outputs:
        if requested.name == LABEL:
            k = max(1, min(call.top_k or 1, c))
            data = [s.label.encode() for r in result.rows for s in r.prediction.top(k)]
            out.append(OutputTensor(LABEL, BYTES, [n] if k == 1 else [n, k], data, requested))
        elif requested.name == SCORES and requested.classification:
            k = min(requested.classification, c)
            data = [f"{s.score:f}:{s.index}:{s.label}".encode() for r in result.rows for s in r.prediction.top(k)]
            out.append(OutputTensor(SCORES, BYTES, [n, k], data, requested))
        elif requested.name == SCORES:
            scores = np.stack([r.prediction.probabilities() for r in result.rows]).astype(np.float32, copy=False)
            out.append(OutputTensor(SCORES, FP32, [n, c], scores, requested))
        else:
            logits = np.stack([r.prediction.logit_array() for r in result.rows]).astype(np.float32, copy=False)
            out.append(OutputTensor(LOGITS, FP32, [n, c], logits, requested))
    return out


def model_metadata(task: str, version: str, labels: list[str]) -> dict:
    c = len(labels)
    return {
        "name": task, "versions": [version], "platform": PLATFORM,
        "inputs": [{"name": TEXT, "datatype": BYTES, "shape": [-1]},
                   {"name": TEXT_PAIR, "datatype": BYTES, "shape": [-1]}],
        "outputs": [{"name": LABEL, "datatype": BYTES, "shape": [-1]},
                    {"name": SCORES, "datatype": FP32, "shape": [-1, c]},
                    {"name": LOGITS, "datatype": FP32, "shape": [-1, c]}],
    }


def model_config(task: str, labels: list[str], max_texts: int, peft_type: str, rank: int) -> dict:
    """Triton's model configuration, as its JSON (HTTP) and as the fields of ModelConfig (gRPC). The
    batch dimension is explicit in the shapes (max_batch_size 0); `max_texts_per_request` says how many
    texts one request may carry, and the label list travels as a parameter."""
    c = len(labels)
    return {
        "name": task, "platform": PLATFORM, "backend": SERVER_NAME, "max_batch_size": 0,
        "input": [{"name": TEXT, "data_type": "TYPE_STRING", "dims": [-1]},
                  {"name": TEXT_PAIR, "data_type": "TYPE_STRING", "dims": [-1], "optional": True}],
        "output": [{"name": LABEL, "data_type": "TYPE_STRING", "dims": [-1]},
                   {"name": SCORES, "data_type": "TYPE_FP32", "dims": [-1, c]},
                   {"name": LOGITS, "data_type": "TYPE_FP32", "dims": [-1, c]}],
        "parameters": {"labels": {"string_value": json.dumps(labels)},
                       "max_texts_per_request": {"string_value": str(max_texts)},
                       "peft_type": {"string_value": peft_type}, "rank": {"string_value": str(rank)}},
    }


def model_statistics(entries, statistics: dict) -> dict:
    """Triton's statistics (ModelStatisticsResponse) of these tasks, as its JSON; the gRPC answer is
    parsed from the same object."""
    stats = []
    for entry in entries:
        s = statistics.get(entry.task) or TaskStatistics()
        stats.append({
            "name": entry.task, "version": entry.version, "last_inference": s.last_inference_ms,
            "inference_count": s.texts, "execution_count": s.requests,
            "inference_stats": {
                "success": {"count": s.success_count, "ns": s.success_ns},
                "fail": {"count": s.fail_count, "ns": s.fail_ns},
                "queue": {"count": s.success_count, "ns": s.queue_ns},
                "compute_input": {"count": s.success_count, "ns": s.tokenize_ns},
                "compute_infer": {"count": s.success_count, "ns": s.inference_ns},
                "compute_output": {"count": 0, "ns": 0},
            }})
    return {"model_stats": stats}


def server_metadata() -> dict:
    return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}
