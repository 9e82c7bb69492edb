"""Registered adapters on disk, so a restart restores every task with the same version.

Layout under --data-dir:
    blobs/<sha256>         content-addressed adapter files (written once, never modified)
    manifest.json          {"tasks": {task: {"files": {name: sha256}, "labels": [...], "metadata": {...},
                                              "version": ..., "registered_at": ..., "info": {...}}},
                            "flags": {...}, "generation": N}
                           (info: what the adapter is — kind, rank, targets, size — as parsed at registration;
                            generation: counts changes, so readers elsewhere can tell they are behind)
    manifest.json.prev     the manifest before the last change

Contract:
- A change is staged, persisted, then committed: new blobs are written and fsynced, then a new
  manifest is written beside the old one (temp file, fsync, rename, fsync of the directory), and only
  then does the in-memory manifest change. A change that fails to persist (a full disk, a read-only
  mount) leaves memory and disk as they were and raises StoreFullError / StoreUnavailableError, which
  say why. A crash at any point leaves either the old manifest or the new one.
- Blobs no manifest version names are deleted after each change and at start, except those of a
  replaced or removed version that requests still use (`retain` / `release`, in memory: after a restart
  no request is in flight); temp files of killed writes are swept at start.
- At start every task's blobs are checked against their sha256. A task with a missing or damaged blob
  is quarantined (`damaged`: task -> why), not served, and does not stop the healthy ones; registering
  it again replaces it. A manifest that cannot be read falls back to manifest.json.prev.
"""
from __future__ import annotations

import copy
import errno
import hashlib
import json
import logging
import os
import tempfile
import threading
from typing import Optional

from adapterserve.runtime.errors import StoreFullError, StoreUnavailableError

log = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"
_FULL = (errno.ENOSPC, errno.EDQUOT)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: str, data: bytes) -> None:
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX)
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


def _encode(manifest: dict) -> bytes:
    return json.dumps(manifest, indent=1, sort_keys=True).encode()


class AdapterStore:
    def __init__(self, data_dir: str) -> None:
        self.root = os.path.abspath(data_dir)
        self.blobs = os.path.join(self.root, "blobs")
        self.manifest_path = os.path.join(self.root, "manifest.json")
        self.previous_path = self.manifest_path + ".prev"
        try:
            os.makedirs(self.blobs, exist_ok=True)
        except OSError as e:
            raise self._error(e, "create") from None
        self._lock = threading.Lock()
        self._sweep_temp_files()
        self._manifest = self._read_manifest()
        self.damaged: dict[str, str] = self._verify()
        # (task, version) -> file digests of versions no longer in the manifest but still in use
        self._retained: dict[tuple[str, str], dict[str, str]] = {}
        self._collect_garbage(self._manifest)

    # -- reading ---------------------------------------------------------------------------------
    def _read_manifest(self) -> dict:
        for path in (self.manifest_path, self.previous_path):
            if not os.path.exists(path):
                continue
            try:
                with open(path, "rb") as fh:
                    manifest = json.loads(fh.read())
                if not isinstance(manifest, dict) or not isinstance(manifest.get("tasks", {}), dict):
                    raise ValueError("not a manifest object")
            except (OSError, ValueError, RecursionError) as e:
                log.error("data dir %s: %s is unreadable (%s)%s", self.root, os.path.basename(path), e,
                          "; trying the previous one" if path == self.manifest_path else "")
                continue
            if path == self.previous_path:
                log.error("data dir %s: restored from %s: the last change before the damage is lost", self.root,
                          os.path.basename(path))
            manifest.setdefault("tasks", {})
            return manifest
        if os.path.exists(self.manifest_path):
            log.error("data dir %s: no readable manifest; starting empty (the damaged file stays for inspection)",
                      self.root)
        return {"tasks": {}}

    def _verify(self) -> dict[str, str]:
        damaged = {}
        for task, entry in self._manifest["tasks"].items():
            try:
                for name, digest in entry["files"].items():
                    path = os.path.join(self.blobs, digest)
                    if not os.path.exists(path):
                        raise ValueError(f"its {name} (blob {digest[:12]}) is missing")
                    with open(path, "rb") as fh:
                        if hashlib.sha256(fh.read()).hexdigest() != digest:
                            raise ValueError(f"its {name} (blob {digest[:12]}) fails its checksum")
            except (ValueError, KeyError, TypeError, AttributeError, OSError) as e:
                damaged[task] = f"{e}; register it again to replace it" if isinstance(e, ValueError) \
                    else f"its manifest entry is unreadable ({e!r}); register it again to replace it"
                log.error("data dir %s: task %s quarantined: %s", self.root, task, damaged[task])
        return damaged

    def _sweep_temp_files(self) -> None:
        for directory in (self.root, self.blobs):
            for name in os.listdir(directory):
                if name.startswith(TEMP_PREFIX):
                    try:
                        os.unlink(os.path.join(directory, name))
                        log.info("data dir %s: removed %s left by an interrupted write", self.root, name)
                    except OSError:
                        pass

    def tasks(self) -> dict:
        """Every healthy task's manifest entry (a copy)."""
        with self._lock:
            return {t: copy.deepcopy(e) for t, e in self._manifest["tasks"].items() if t not in self.damaged}

    @property
    def generation(self) -> int:
        """How many changes the manifest has seen; every committed change adds one."""
        return int(self._manifest.get("generation", 0))

    def version_of(self, task: str) -> Optional[str]:
        entry = self._manifest["tasks"].get(task)
        return entry["version"] if entry and task not in self.damaged else None

    def load_files(self, task: str, version: Optional[str] = None) -> dict[str, bytes]:
        """The files of the task's current version, or of `version` if it is current or retained."""
        entry = self._manifest["tasks"].get(task)
        if version is not None and (entry is None or entry["version"] != version):
            digests = self._retained.get((task, version))
            if digests is None:
                raise IOError(f"version {version[:12]} of task {task} is no longer in the data dir")
        else:
            digests = entry["files"]
        files = {}
        for name, digest in digests.items():
            with open(os.path.join(self.blobs, digest), "rb") as fh:
                data = fh.read()
            if hashlib.sha256(data).hexdigest() != digest:
                raise IOError(f"blob {digest} of task {task} is corrupt")
            files[name] = data
        return files

    def holds(self, task: str, version: str) -> bool:
        """Whether the files of this version can be read back (current, or retained while in use)."""
        return self.version_of(task) == version or (task, version) in self._retained

    def retain(self, task: str) -> None:
        """Keep the task's current version's blobs past a replace or removal, until release()."""
        with self._lock:
            entry = self._manifest["tasks"].get(task)
            if entry is not None and task not in self.damaged:
                self._retained[(task, entry["version"])] = dict(entry["files"])

    def release(self, task: str, version: str) -> None:
        """No request uses this version any more: its blobs may go (unless a manifest version names them)."""
        with self._lock:
            if self._retained.pop((task, version), None) is not None:
                self._collect_garbage(self._manifest)

    def entry(self, task: str) -> Optional[dict]:
        with self._lock:
            found = self._manifest["tasks"].get(task)
            return copy.deepcopy(found) if found is not None else None

    # -- changing --------------------------------------------------------------------------------
    def put(self, task: str, files: dict[str, bytes], version: str, labels: list[str],
            metadata: Optional[dict], registered_at: float, info: Optional[dict] = None) -> None:
        digests = {}
        try:
            for name, data in files.items():
                digest = hashlib.sha256(data).hexdigest()
                path = os.path.join(self.blobs, digest)
                if not os.path.exists(path):
                    _atomic_write(path, data)
                digests[name] = digest
        except OSError as e:
            self._collect_garbage(self._manifest)  # blobs of this failed change
            raise self._error(e, f"store task {task}") from None
        self._change(lambda m: m["tasks"].__setitem__(task, {
            "files": digests, "version": version, "labels": list(labels), "metadata": dict(metadata or {}),
            "registered_at": registered_at, **({"info": dict(info)} if info else {})}), f"store task {task}")
        self.damaged.pop(task, None)

    def restore_entry(self, task: str, entry: Optional[dict]) -> None:
        """Put back what entry() returned before a change that could not complete elsewhere."""
        if entry is None:
            self.remove(task)
        else:
            self._change(lambda m: m["tasks"].__setitem__(task, entry), f"restore task {task}")

    def remove(self, task: str) -> None:
        self._change(lambda m: m["tasks"].pop(task, None), f"remove task {task}")
        self.damaged.pop(task, None)

    def flag(self, name: str) -> bool:
        return bool(self._manifest.get("flags", {}).get(name))

    def set_flag(self, name: str) -> None:
        self._change(lambda m: m.setdefault("flags", {}).__setitem__(name, True), f"set {name}")

    def _change(self, apply, what: str) -> None:
        """Apply `apply` to a copy of the manifest, persist the copy, and only then make it current."""
        with self._lock:
            staged = copy.deepcopy(self._manifest)
            apply(staged)
            staged["generation"] = self.generation + 1
            try:
                # The current state becomes .prev, what a damaged manifest falls back to. Written from
                # memory, not copied from the file: after a start from .prev the file is the damaged one.
                _atomic_write(self.previous_path, _encode(self._manifest))
                _atomic_write(self.manifest_path, _encode(staged))
            except OSError as e:
                raise self._error(e, what) from None
            self._manifest = staged
            self._collect_garbage(staged)

    def _collect_garbage(self, manifest: dict) -> None:
        """Delete blobs no version in the manifest names (replaced or removed tasks' files). Best
        effort: a blob that cannot be deleted now is deleted at the next change or start."""
        live = {d for t in manifest["tasks"].values() if isinstance(t, dict)
                for d in (t.get("files") or {}).values()}
        live |= {d for files in self._retained.values() for d in files.values()}
        for name in os.listdir(self.blobs):
            if name not in live and not name.startswith(TEMP_PREFIX):
                try:
                    os.unlink(os.path.join(self.blobs, name))
                except OSError:
                    pass

    def _error(self, e: OSError, what: str):
        if e.errno in _FULL:
            return StoreFullError(f"cannot {what}: no space left on device in --data-dir {self.root}; nothing was "
                                  "changed; free space there and retry")
        return StoreUnavailableError(f"cannot {what}: {e.strerror or e} in --data-dir {self.root}; nothing was "
                                     "changed; fix the directory and retry")
