"""Registered adapters on disk, so a restart restores every task with the same version.

Layout under --data-dir:
    blobs/<sha256>         content-addressed adapter files (written once, never modified)
    manifest.json          {"tasks": {task: {"files": {name: sha256}, "labels": [...], "metadata": {...},
                                              "version": ..., "registered_at": ...}}}

The manifest is replaced atomically (temp file, fsync, rename, fsync of the directory), so a crash
mid-register leaves either the old manifest or the new one, never a broken one. Blobs are written
before the manifest that names them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from typing import Optional

log = logging.getLogger(__name__)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str, data: bytes) -> None:
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(directory)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class AdapterStore:
    def __init__(self, data_dir: str) -> None:
        self.root = os.path.abspath(data_dir)
        self.blobs = os.path.join(self.root, "blobs")
        self.manifest_path = os.path.join(self.root, "manifest.json")
        os.makedirs(self.blobs, exist_ok=True)
        self._lock = threading.Lock()
        self._manifest = self._read_manifest()

    def _read_manifest(self) -> dict:
        if not os.path.exists(self.manifest_path):
            return {"tasks": {}}
        with open(self.manifest_path, "rb") as fh:
            manifest = json.loads(fh.read())
        manifest.setdefault("tasks", {})
        return manifest

    def tasks(self) -> dict:
        with self._lock:
            return json.loads(json.dumps(self._manifest["tasks"]))

    def version_of(self, task: str) -> Optional[str]:
        entry = self._manifest["tasks"].get(task)
        return entry["version"] if entry else None

    def load_files(self, task: str) -> dict[str, bytes]:
        entry = self._manifest["tasks"][task]
        files = {}
        for name, digest in entry["files"].items():
            with open(os.path.join(self.blobs, digest), "rb") as fh:
                data = fh.read()
            if hashlib.sha256(data).hexdigest() != digest:
                raise IOError(f"blob {digest} of task {task} is corrupt")
            files[name] = data
        return files

    def put(self, task: str, files: dict[str, bytes], version: str, labels: list[str],
            metadata: Optional[dict], registered_at: float) -> None:
        digests = {}
        for name, data in files.items():
            digest = hashlib.sha256(data).hexdigest()
            path = os.path.join(self.blobs, digest)
            if not os.path.exists(path):
                _atomic_write(path, data)
            digests[name] = digest
        with self._lock:
            self._manifest["tasks"][task] = {"files": digests, "version": version, "labels": labels,
                                             "metadata": dict(metadata or {}), "registered_at": registered_at}
            self._write_manifest()

    def remove(self, task: str) -> None:
        with self._lock:
            if self._manifest["tasks"].pop(task, None) is not None:
                self._write_manifest()
            self._collect_garbage()

    def _write_manifest(self) -> None:
        _atomic_write(self.manifest_path, json.dumps(self._manifest, indent=1, sort_keys=True).encode())

    def _collect_garbage(self) -> None:
        live = {d for t in self._manifest["tasks"].values() for d in t["files"].values()}
        for name in os.listdir(self.blobs):
            if name not in live and not name.startswith(".tmp-"):
                os.unlink(os.path.join(self.blobs, name))

    def flag(self, name: str) -> bool:
        return bool(self._manifest.get("flags", {}).get(name))

    def set_flag(self, name: str) -> None:
        with self._lock:
            self._manifest.setdefault("flags", {})[name] = True
            self._write_manifest()
