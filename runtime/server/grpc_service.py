"""adapterserve.v1 gRPC servicers (Classifier, AdapterRegistry) and the registration logic that every
front end shares (AdapterService: validate, persist, register).

Classify translates to and from the shared classify path (classify.py).
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional


from adapterserve import __version__
from adapterserve.adapters import EXAMPLE_TASKS, EXAMPLES_DIR
from adapterserve.adapters import bottleneck
from adapterserve.adapters.peft_lora import CONFIG_FILE, LABELS_FILE, WEIGHTS_FILE
from adapterserve.adapters.store import AdapterStore
from adapterserve.runtime.server.auth import token_problem
from adapterserve.runtime.server.classify import ClassifyService, answer_in_order
from adapterserve.runtime.config import ServerConfig
from adapterserve.runtime.errors import (AdapterServeError, ConfigError, DeadlineExceededError, InvalidInputError,
                                         PermissionDeniedError, QuarantinedTaskError, ResourceExhaustedError,
                                         TaskExistsError, UnauthenticatedError, UnavailableError)
from adapterserve.runtime.native.hardware import probe
from adapterserve.runtime.server.stubs import pb, pb_grpc
from adapterserve.runtime.runtime import AdapterInfo, Runtime, check_task_name

log = logging.getLogger(__name__)



def adapter_message(info: AdapterInfo) -> pb.Adapter:
    return pb.Adapter(
        task=info.task, version=info.version, peft_type=info.peft_type, rank=info.rank,
        target_modules=info.target_modules, labels=info.labels, size_bytes=info.size_bytes,
        residency=pb.Residency.Value(info.residency), registered_at=info.registered_at,
        metadata={str(k): str(v) for k, v in info.metadata.items()},
    )


def request_path(request: pb.RegisterAdapterRequest, config: ServerConfig) -> str:
    """The directory a RegisterAdapter(path) names, under --adapter-root (refused without one)."""
    if not config.adapter_root:
        raise PermissionDeniedError("registering by path is disabled: the server has no --adapter-root; upload the "
                                    "files instead")
    return request.path if os.path.isabs(request.path) else os.path.join(config.adapter_root, request.path)


def uploaded_files(request: pb.RegisterAdapterRequest, config: ServerConfig) -> dict[str, bytes]:
    """A RegisterAdapter(files) upload as adapter files, refused above --max-adapter-bytes: PEFT's
    files, or AdapterHub's (adapter_config.json and other_files)."""
    upload = request.files
    unknown = sorted(set(upload.other_files) - set(bottleneck.FILES[1:]))
    if unknown:
        raise InvalidInputError(f"other_files may hold {', '.join(bottleneck.FILES[1:])} (an AdapterHub adapter); "
                                f"not {', '.join(repr(n[:64]) for n in unknown[:3])}")
    files = {CONFIG_FILE: upload.adapter_config}
    if upload.adapter_weights or not upload.other_files:
        files[WEIGHTS_FILE] = upload.adapter_weights
    if upload.labels_json:
        files[LABELS_FILE] = upload.labels_json
    files.update(upload.other_files)
    size = sum(len(v) for v in files.values())
    if size > config.max_adapter_bytes:
        raise ResourceExhaustedError(f"adapter upload is {size} bytes, above the limit of {config.max_adapter_bytes}; "
                                     "shrink it or raise --max-adapter-bytes", reason="adapter_too_large")
    return files


class AdapterService:
    """Registration logic shared by the RPCs and start-up: validate, persist, then register."""

    def __init__(self, runtime: Runtime, config: ServerConfig, executor: ThreadPoolExecutor,
                 store: Optional[AdapterStore], on_unregistered: Optional[Callable[[str], None]] = None) -> None:
        """store: the data dir (None: memory only); the runtime reads its disk tier from the same store.
        on_unregistered(task) drops the task's metric series."""
        self.runtime = runtime
        self.config = config
        self.executor = executor
        self.store = store
        self._lock = asyncio.Lock()  # one registry mutation at a time; classify is never blocked by it
        self.on_unregistered = on_unregistered

    def restore(self) -> None:
        """Start-up: every task in the data dir with its stored version; then the bundled examples,
        once (an operator who unregisters them does not get them back on restart)."""
        if self.store is not None:
            for task, entry in sorted(self.store.tasks().items()):
                try:
                    files = self.store.load_files(task)
                    info = self.runtime.add_adapter(task, files, labels=entry.get("labels"),
                                                    metadata=entry.get("metadata"))
                except (AdapterServeError, OSError) as e:
                    # One task that no longer loads (damaged between the check and now, or made for
                    # another base) must not keep every healthy one from serving.
                    self.store.damaged[task] = f"it no longer loads ({e}); register it again to replace it"
                    log.error("task %s quarantined: %s", task, self.store.damaged[task])
                    continue
                if info.version != entry["version"]:
                    log.warning("task %s restored with version %s, manifest says %s", task, info.version, entry["version"])
        seeded = self.store is not None and self.store.flag("examples_registered")
        if self.config.register_examples and not seeded:
            for task in EXAMPLE_TASKS:
                path = os.path.join(EXAMPLES_DIR, task)
                if task in self.runtime.registry or not os.path.isdir(path):
                    continue
                spec = self.runtime.load_spec(path)
                self._persist(task, spec)
                self.runtime.add_adapter(task, spec)
            if self.store is not None:
                self.store.set_flag("examples_registered")
        for task, path in self.config.preload():
            self._preload(task, path)

    def _preload(self, task: str, path: str) -> None:
        """--adapter TASK=DIR: registered (and persisted) at start; a stored version of the task that
        differs from the directory's is replaced by it, the same one is left as it is."""
        check_task_name(task)
        if not os.path.isdir(path):
            raise ConfigError(f"--adapter {task}={path}: no such directory")
        spec = self.runtime.load_spec(path)
        if task in self.runtime.registry and self.runtime.registry.get(task).version == spec.version:
            return
        self._persist(task, spec)
        self.runtime.add_adapter(task, spec, replace=task in self.runtime.registry)

    def _persist(self, task, spec) -> None:
        if self.store is not None:
            if task in self.runtime.registry:
                # Requests may still use the version being replaced: its blobs stay readable (disk
                # tier) until the runtime retires it and releases them.
                self.store.retain(task)
            self.store.put(task, spec.files, spec.version, spec.labels, spec.metadata, time.time(), spec.summary())

    async def register(self, request: pb.RegisterAdapterRequest, deadline: Optional[float] = None) -> AdapterInfo:
        """deadline: the caller's, as time.monotonic(); past it nothing more is read and nothing is stored."""
        source = request.WhichOneof("source")
        labels = list(request.labels) or None
        metadata = dict(request.metadata)
        if source == "path":
            path = request_path(request, self.config)
            load = lambda: self.runtime.load_spec(path, labels, metadata, allowed_root=self.config.adapter_root,  # noqa: E731
                                                  max_bytes=self.config.max_adapter_bytes, deadline=deadline)
        elif source == "files":
            files = uploaded_files(request, self.config)
            load = lambda: self.runtime.load_spec(files, labels, metadata)  # noqa: E731
        else:
            raise InvalidInputError("RegisterAdapter needs a source: set path or files")
        check_task_name(request.task)  # before parsing anything
        loop = asyncio.get_running_loop()
        spec = await loop.run_in_executor(self.executor, load)  # validation never touches a slot
        async with self._lock:
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceededError("the request's deadline passed while the adapter was validated; nothing "
                                            "was registered (the caller has stopped waiting)")
            if request.task in self.runtime.registry and not request.replace:
                old = self.runtime.registry.get(request.task)
                raise TaskExistsError(f"task {request.task!r} is already registered (version {old.version[:12]}); "
                                      "set replace=true to swap it")
            previous = self.store.entry(request.task) if self.store is not None else None
            await loop.run_in_executor(self.executor, self._persist, request.task, spec)
            try:
                return await loop.run_in_executor(
                    self.executor, lambda: self.runtime.add_adapter(request.task, spec, replace=request.replace))
            except BaseException:
                # Registered on disk but not in memory would appear after a restart: undo the disk side.
                if self.store is not None:
                    await loop.run_in_executor(self.executor, self.store.restore_entry, request.task, previous)
                raise

    def quarantined(self, task: str) -> Optional[str]:
        """Why a task in the data dir is not served, or None."""
        return self.store.damaged.get(task) if self.store is not None else None

    async def unregister(self, task: str) -> AdapterInfo:
        async with self._lock:
            loop = asyncio.get_running_loop()
            why = self.quarantined(task)
            if why is not None and task not in self.runtime.registry:
                entry = self.store.entry(task) or {}
                await loop.run_in_executor(self.executor, self.store.remove, task)
                return AdapterInfo(task=task, version=str(entry.get("version", "")), peft_type="", rank=0,
                                   target_modules=[], labels=list(entry.get("labels") or []), size_bytes=0,
                                   residency="DISK", registered_at=float(entry.get("registered_at") or 0.0),
                                   metadata={"quarantined": why})
            info = self.runtime.get_adapter(task)  # NOT_FOUND before anything changes
            if self.store is not None:
                self.store.retain(task)  # released when the runtime retires the version (last request done)
                await loop.run_in_executor(self.executor, self.store.remove, task)
            removed = await loop.run_in_executor(self.executor, self.runtime.remove_adapter, info.task)
            if self.on_unregistered is not None:
                self.on_unregistered(info.task)
            return removed


class ClassifierServicer(pb_grpc.ClassifierServicer):
    def __init__(self, classify: ClassifyService) -> None:
        self.service = classify
        self.config = classify.config

    async def _classify(self, request: pb.ClassifyRequest, context, stream: bool = False) -> pb.ClassifyResponse:
        result = await self.service.classify(
            request.task, list(request.texts), list(request.text_pairs), request.truncate,
            peer=context.peer() if context is not None else "local",
            remaining=context.time_remaining() if context is not None else None, stream=stream)
        top_k = request.top_k or None
        predictions = [
            pb.Prediction(
                scores=[pb.LabelScore(label=s.label, index=s.index, score=s.score) for s in p.top(top_k)],
                input_tokens=p.input_tokens, truncated=p.truncated)
            for p in (r.prediction for r in result.rows)
        ]
        return pb.ClassifyResponse(
            request_id=request.request_id, task=request.task, adapter_version=result.adapter_version,
            predictions=predictions,
            timings=pb.Timings(queue_ns=result.queue_ns, tokenize_ns=result.tokenize_ns,
                               inference_ns=result.inference_ns, total_ns=result.total_ns),
        )

    async def Classify(self, request, context):
        return await self._classify(request, context)

    async def ClassifyStream(self, request_iterator, context):
        async for response in answer_in_order(request_iterator, lambda r: self._classify(r, context, stream=True),
                                              self.config.max_stream_inflight):
            yield response

    async def GetInfo(self, request, context):
        self.service.check_ready()
        runtime = self.service.runtime
        base = runtime.base
        cfg = runtime.config
        return pb.ServerInfo(
            base_model=base.model_id, precision=runtime.precision, engine=runtime.engine.name,
            device=str(base.device), max_input_length=base.max_length,
            max_texts_per_request=self.config.max_texts_per_request, max_batch_tokens=cfg.max_batch_tokens,
            slots=cfg.slots, r_max=cfg.r_max, max_adapter_bytes=self.config.max_adapter_bytes, version=__version__,
            registered_adapters=len(runtime.registry), paths=runtime.serving_paths(),
            hardware=probe().summary(),
        )


class RegistryServicer(pb_grpc.AdapterRegistryServicer):
    def __init__(self, admin_token: Optional[str]) -> None:
        self.service: Optional[AdapterService] = None
        self.admin_token = admin_token

    def attach(self, service: AdapterService) -> None:
        self.service = service

    def _authorize(self, context) -> None:
        if self.service is None:
            raise UnavailableError("the base model is still loading; retry when health reports SERVING")
        if not self.admin_token:
            return
        # The interceptor (auth.py) refused bad tokens before the body was read; checked again here so
        # the servicer is safe on its own.
        problem = token_problem(context.invocation_metadata(), self.admin_token)
        if problem is not None:
            raise UnauthenticatedError(problem)

    async def RegisterAdapter(self, request, context):
        self._authorize(context)
        remaining = context.time_remaining()
        return adapter_message(await self.service.register(
            request, time.monotonic() + remaining if remaining is not None else None))

    async def UnregisterAdapter(self, request, context):
        self._authorize(context)
        return adapter_message(await self.service.unregister(request.task))

    async def ListAdapters(self, request, context):
        self._authorize(context)
        return pb.ListAdaptersResponse(adapters=[adapter_message(i) for i in self.service.runtime.list_adapters()])

    async def GetAdapter(self, request, context):
        self._authorize(context)
        if not request.task:
            raise InvalidInputError("task is empty")
        why = self.service.quarantined(request.task)
        if why is not None and request.task not in self.service.runtime.registry:
            raise QuarantinedTaskError(f"task {request.task!r} is in the data dir but not served: {why}")
        return adapter_message(self.service.runtime.get_adapter(request.task))
