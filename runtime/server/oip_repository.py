"""Triton's model repository extension over the adapter registry: index, load, unload.

The repository is the registry plus --adapter-root: `load` of a task with no source loads the PEFT
directory of the same name under --adapter-root (as Triton loads a model from its repository);
`path` names another directory there; `file:<name>` parameters upload adapter_config.json,
adapter_model.safetensors and labels.json, or an AdapterHub adapter's adapter_config.json,
adapter.safetensors, head_config.json and model_head.safetensors (Triton's override files); `config` (Triton's model
configuration JSON) may carry {"parameters": {"labels": ...}}. A load of a registered task replaces
it atomically (Triton's reload). Every load goes through AdapterService.register: the same
validation, limits, persistence and admin token as RegisterAdapter.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from adapterserve.adapters import bottleneck
from adapterserve.adapters.peft_lora import CONFIG_FILE, LABELS_FILE, WEIGHTS_FILE
from adapterserve.runtime.errors import InvalidInputError, UnknownTaskError
from adapterserve.runtime.server.classify import check_version
from adapterserve.runtime.server.grpc_service import AdapterService
from adapterserve.runtime.server.stubs import pb
from adapterserve.runtime.types import check_task_name

UPLOAD_FILES = {CONFIG_FILE: "adapter_config", WEIGHTS_FILE: "adapter_weights", LABELS_FILE: "labels_json"}
OTHER_FILES = bottleneck.FILES[1:]  # AdapterHub's, carried in AdapterFiles.other_files
READY, UNAVAILABLE = "READY", "UNAVAILABLE"


def _labels(value, where: str) -> list[str]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, dict) and "string_value" in value:  # a Triton ModelParameter
        return _labels(value["string_value"], where)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidInputError(f"{where} must be a JSON list of label names")
    return value


def load_request(service: AdapterService, task: str, parameters: dict) -> pb.RegisterAdapterRequest:
    """The RegisterAdapter request a repository load stands for. parameters: name -> str, bytes, bool or int."""
    check_task_name(task)
    request = pb.RegisterAdapterRequest(task=task, replace=True)
    files = {}
    for name, value in parameters.items():
        if name.startswith("file:"):
            base = os.path.basename(name[5:])
            if base not in UPLOAD_FILES and base not in OTHER_FILES:
                raise InvalidInputError(f"parameter {name}: an upload is one of "
                                        f"{', '.join('file:' + f for f in (*UPLOAD_FILES, *OTHER_FILES))}")
            if not isinstance(value, (bytes, bytearray)):
                raise InvalidInputError(f"parameter {name} must carry the file's bytes")
            files[base] = bytes(value)
        elif name == "config":
            try:
                config = json.loads(value) if isinstance(value, (str, bytes)) else None
            except json.JSONDecodeError as e:
                raise InvalidInputError(f"parameter config is not JSON ({e.msg}); send Triton's model configuration as JSON") from None
            if not isinstance(config, dict):
                raise InvalidInputError("parameter config must be a JSON object (Triton's model configuration)")
            labels = config.get("labels", (config.get("parameters") or {}).get("labels"))
            if labels is not None:
                request.labels.extend(_labels(labels, "config labels"))
        elif name == "labels":
            request.labels.extend(_labels(value, "parameter labels"))
        elif name == "path":
            if not isinstance(value, str) or not value:
                raise InvalidInputError("parameter path must be a directory under --adapter-root")
            request.path = value
    if files:
        if request.HasField("path"):
            raise InvalidInputError("give either path or file: uploads, not both")
        other = {k: v for k, v in files.items() if k in OTHER_FILES}
        missing = [f for f in (CONFIG_FILE, *(() if other else (WEIGHTS_FILE,))) if f not in files]
        if missing:
            raise InvalidInputError(f"the upload lacks {', '.join('file:' + m for m in missing)}")
        request.files.CopyFrom(pb.AdapterFiles(**{UPLOAD_FILES[k]: v for k, v in files.items() if k in UPLOAD_FILES},
                                               other_files=other))
    elif not request.HasField("path"):
        root = service.config.adapter_root
        if not root or not os.path.isdir(os.path.join(root, task)):
            where = f"--adapter-root has no directory {task!r}" if root else "the server has no --adapter-root"
            raise InvalidInputError(f"nothing to load for {task!r}: {where}; pass a path parameter or upload the "
                                    f"files as {', '.join('file:' + f for f in UPLOAD_FILES)}")
        request.path = task
    return request


async def load(service: AdapterService, task: str, parameters: dict, deadline: Optional[float]) -> None:
    await service.register(load_request(service, task, parameters), deadline)


async def unload(service: AdapterService, task: str) -> None:
    if not task:
        raise InvalidInputError("model name is empty; name the task to unload")
    await service.unregister(task)


def index(service: AdapterService, ready_only: bool) -> list[dict]:
    """Every task served (READY), quarantined in the data dir, or present under --adapter-root but not
    loaded (UNAVAILABLE, with the reason)."""
    models = {a.task: {"name": a.task, "version": a.version, "state": READY, "reason": ""}
              for a in service.runtime.list_adapters()}
    if not ready_only:
        for task, why in (service.store.damaged.items() if service.store is not None else ()):
            models.setdefault(task, {"name": task, "version": "", "state": UNAVAILABLE, "reason": why})
        root = service.config.adapter_root
        if root and os.path.isdir(root):
            for name in sorted(os.listdir(root)):
                if name not in models and os.path.isfile(os.path.join(root, name, CONFIG_FILE)):
                    models[name] = {"name": name, "version": "", "state": UNAVAILABLE, "reason": "unloaded"}
    return [models[k] for k in sorted(models)]


def require_model(service: AdapterService, task: str, version: str = ""):
    """The task's current entry, at `version` if one is named; NOT_FOUND (naming the quarantine reason, or
    the current version) otherwise."""
    if not task:
        raise InvalidInputError("model name is empty; name a task (POST /v2/repository/index lists them)")
    why = service.quarantined(task)
    if why is not None and task not in service.runtime.registry:
        raise UnknownTaskError(f"model {task!r} is in the data dir but not served: {why}")
    if task not in service.runtime.registry:
        raise UnknownTaskError(f"unknown model {task[:64]!r}: no task of that name is registered (the repository "
                               "index lists the models)")
    entry = service.runtime.registry.get(task)
    check_version(task, entry.version, version)
    return entry
