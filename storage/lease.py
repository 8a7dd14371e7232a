"""Per-shard leases: at most one run works on a shard at a time, and a crashed run's lease expires.

    with Lease(output_url):          # raises ShardBusyError when another live run holds it
        ...                          # a daemon thread renews it every ttl/3 while the block runs

The lease is `<output>.lease`, a small JSON record {owner, expires}. On local disks it is created with O_EXCL, so
exactly one of two racing runs wins. Object stores have no exclusive create here: the lease is written, then read
back, and the run whose owner id is there wins; a rare double win costs duplicate work, never wrong output,
because part files carry unique attempt ids and the merge keeps one row per key (`storage.shard`).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from storage.errors import ShardBusyError
from storage.urls import filesystem, protocol_of

LEASE_SUFFIX = ".lease"
DEFAULT_TTL = 600.0  # seconds without a renewal before another run may take the shard over


class Lease:
    def __init__(self, output_url: str, ttl: float = DEFAULT_TTL) -> None:
        self.fs, path = filesystem(output_url)
        self.path = path + LEASE_SUFFIX
        self.ttl = ttl
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- record -------------------------------------------------------------------------------------------------

    def _record(self) -> bytes:
        return json.dumps({"owner": self.owner, "expires": time.time() + self.ttl}).encode()

    def _read(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except (FileNotFoundError, ValueError):
            return None

    def _create_local(self) -> bool:
        self.fs.makedirs(self.fs._parent(self.path), exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(self._record())
        return True

    def _try_acquire(self) -> bool:
        held = self._read()
        if held is not None and held.get("expires", 0) > time.time() and held.get("owner") != self.owner:
            return False
        if protocol_of(self.fs) in ("file", "local"):
            if held is not None:  # expired: its owner crashed; remove it and race for a fresh one
                try:
                    self.fs.rm(self.path)
                except FileNotFoundError:
                    pass
            return self._create_local()
        self.fs.pipe_file(self.path, self._record())
        time.sleep(0.05)
        now = self._read()
        return now is not None and now.get("owner") == self.owner

    def acquire(self) -> None:
        if not self._try_acquire():
            held = self._read() or {}
            until = time.strftime("%H:%M:%S", time.localtime(held.get("expires", 0)))
            raise ShardBusyError(f"{self.path.removesuffix(LEASE_SUFFIX)} is being processed by another run "
                                 f"({held.get('owner', '?')}, lease until {until})")
        self._thread = threading.Thread(target=self._renew_loop, name="lease", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            held = self._read()
            if held is None or held.get("owner") != self.owner:
                return  # taken over after we stalled past the ttl: the merge keeps the output right
            self.fs.pipe_file(self.path, self._record())

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = self._read()
        if held is not None and held.get("owner") == self.owner:
            try:
                self.fs.rm(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
