"""A small gRPC client for adapterserve.v1: what `adapterserve register/unregister/list/classify/info`
use, and a starting point for Python callers.

    with Client("127.0.0.1:50051") as c:
        print(c.classify("sst2", ["a charming film"])[0])
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import grpc

from adapterserve.adapters import bottleneck
from adapterserve.adapters.peft_lora import CONFIG_FILE, LABELS_FILE, WEIGHTS_FILE
from adapterserve.runtime.server.stubs import pb, pb_grpc

ADAPTERHUB_FILES = bottleneck.FILES[1:]  # an AdapterHub directory's files beside adapter_config.json

DEFAULT_ADDRESS = "127.0.0.1:50051"


class Client:
    def __init__(self, address: str = DEFAULT_ADDRESS, token: Optional[str] = None, tls_ca: Optional[str] = None,
                 timeout: float = 60.0) -> None:
        options = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        if tls_ca:
            with open(tls_ca, "rb") as fh:
                self.channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(fh.read()), options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.metadata = [("authorization", f"Bearer {token}")] if token else None
        self.timeout = timeout
        self.classifier = pb_grpc.ClassifierStub(self.channel)
        self.registry = pb_grpc.AdapterRegistryStub(self.channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.channel.close()

    def classify(self, task: str, texts: Sequence[str], top_k: int = 0, truncate: bool = True) -> pb.ClassifyResponse:
        return self.classifier.Classify(pb.ClassifyRequest(task=task, texts=list(texts), top_k=top_k, truncate=truncate),
                                        metadata=self.metadata, timeout=self.timeout)

    def info(self) -> pb.ServerInfo:
        return self.classifier.GetInfo(pb.GetInfoRequest(), metadata=self.metadata, timeout=self.timeout)

    def register_dir(self, task: str, directory: str, replace: bool = False,
                     labels: Optional[list[str]] = None) -> pb.Adapter:
        """Upload an adapter directory's files: PEFT's (adapter_config.json, adapter_model.safetensors,
        labels.json if present) or AdapterHub's (adapter_config.json, adapter.safetensors, head_config.json,
        model_head.safetensors)."""
        def read(name: str) -> bytes:
            with open(os.path.join(directory, name), "rb") as fh:
                return fh.read()

        hub = [n for n in ADAPTERHUB_FILES if os.path.isfile(os.path.join(directory, n))]
        for name in (CONFIG_FILE, *(() if hub else (WEIGHTS_FILE,))):
            if not os.path.isfile(os.path.join(directory, name)):
                raise FileNotFoundError(f"{directory} has no {name}; an adapter directory holds {CONFIG_FILE} "
                                        f"and {WEIGHTS_FILE} (and optionally {LABELS_FILE}), or AdapterHub's "
                                        f"{', '.join(ADAPTERHUB_FILES)}")
        files = pb.AdapterFiles(adapter_config=read(CONFIG_FILE), other_files={n: read(n) for n in hub})
        if not hub:
            files.adapter_weights = read(WEIGHTS_FILE)
        if os.path.isfile(os.path.join(directory, LABELS_FILE)):
            files.labels_json = read(LABELS_FILE)
        return self.registry.RegisterAdapter(pb.RegisterAdapterRequest(task=task, files=files, replace=replace,
                                                                       labels=labels or []),
                                             metadata=self.metadata, timeout=self.timeout)

    def register_path(self, task: str, path: str, replace: bool = False,
                      labels: Optional[list[str]] = None) -> pb.Adapter:
        """Register a directory on the server, under its --adapter-root."""
        return self.registry.RegisterAdapter(pb.RegisterAdapterRequest(task=task, path=path, replace=replace,
                                                                       labels=labels or []),
                                             metadata=self.metadata, timeout=self.timeout)

    def unregister(self, task: str) -> pb.Adapter:
        return self.registry.UnregisterAdapter(pb.UnregisterAdapterRequest(task=task), metadata=self.metadata,
                                               timeout=self.timeout)

    def list(self) -> list:
        return list(self.registry.ListAdapters(pb.ListAdaptersRequest(), metadata=self.metadata,
                                               timeout=self.timeout).adapters)
