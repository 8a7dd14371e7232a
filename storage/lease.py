"""Per-shard leases: at most one run works on a shard at a time, and a crashed run's lease does not block the next.

    with Lease(output_url):          # raises ShardBusyError when another live run holds it
        ...                          # a daemon thread renews it every ttl/3 while the block runs

The lease is `<output>.lease`, a small JSON record {owner, host, boot, pid, start, expires}. A lease is free when
  - its owner is on this host and no longer alive: the pid is gone, a zombie, or a different process now (its start
    time, /proc/<pid>/stat field 22, differs from the recorded one; so does the boot id after a reboot). It is
    broken at once: a re-run right after a kill -9 does not wait;
  - or it expired: its owner (on another host, where liveness cannot be checked) stopped renewing for `ttl`
    seconds. A live owner renews every ttl/3.

On local disks a lease is created with a hard link of a complete record (exclusive, like O_EXCL), so exactly one
of two racing runs wins. Breaking, renewing and releasing a local lease happen under an flock of its directory
(held for microseconds; the kernel drops it if the holder dies), so a breaker removes exactly the dead record it
judged and never a fresh lease another run took meanwhile. Object stores have no exclusive create here: the
lease is written, then read back, and the run whose owner id is there wins; a rare double win costs duplicate
work, never wrong output, because part files carry unique attempt ids and the merge keeps one row per key
(`storage.shard`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid

from storage.errors import ShardBusyError
from storage.urls import filesystem, protocol_of

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: breaking is then only as safe as the object-store path
    fcntl = None

LEASE_SUFFIX = ".lease"
DEFAULT_TTL = 60.0  # seconds without a renewal before another host's run may take the shard over


# ---------------------------------------------------------------------------------------------------------------------
# Is a process on this host still the one that wrote a lease?
# ---------------------------------------------------------------------------------------------------------------------


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return None


def process_start(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot, /proc/<pid>/stat field 22); None when there is no
    such process, it is a zombie, or /proc is not there."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # the name (field 2) may hold spaces and parentheses
    if len(fields) < 20 or fields[0] in ("Z", "X"):  # fields[0] is field 3 (state), fields[19] field 22
        return None
    return fields[19]


def owner_alive(record: dict) -> bool | None:
    """True/False for an owner on this host; None when that cannot be told (another host, an old record)."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return None
    if record.get("boot") and _boot_id() and record["boot"] != _boot_id():
        return False  # written before a reboot
    if os.path.isdir("/proc"):
        start = process_start(record["pid"])
        return start is not None and (record.get("start") is None or start == record["start"])
    try:  # no /proc: the pid alone (a reused pid then counts as alive; the TTL still ends it)
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def is_live(record: dict | None, now: float | None = None) -> bool:
    """Does this lease record still hold its shard?"""
    if record is None:
        return False
    if record.get("expires", 0) <= (time.time() if now is None else now):
        return False
    return owner_alive(record) is not False


_ME = {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(), "start": process_start(os.getpid())}


def _me() -> dict:
    if _ME["pid"] != os.getpid():  # a forked child
        _ME.update(pid=os.getpid(), start=process_start(os.getpid()))
    return dict(_ME)


# ---------------------------------------------------------------------------------------------------------------------
# The lease
# ---------------------------------------------------------------------------------------------------------------------


class Lease:
    def __init__(self, output_url: str, ttl: float = DEFAULT_TTL) -> None:
        self.fs, path = filesystem(output_url)
        self.path = path + LEASE_SUFFIX
        self.ttl = ttl
        self.local = protocol_of(self.fs) in ("file", "local")
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- record -------------------------------------------------------------------------------------------------

    def _record(self) -> bytes:
        return json.dumps({"owner": self.owner, **_me(), "expires": time.time() + self.ttl}).encode()

    def _read(self, path: str | None = None) -> dict | None:
        try:
            record = json.loads(self.fs.cat_file(path or self.path))
        except (FileNotFoundError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def _mine(self, held: dict | None) -> bool:
        return held is not None and held.get("owner") == self.owner

    # -- local: exclusive create, and changes under the directory's flock ---------------------------------------

    @contextlib.contextmanager
    def _locked(self):
        """The lease directory's flock: breakers, renewals and releases of local leases take turns."""
        fd = None
        if fcntl is not None:
            try:
                fd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # a filesystem without flock: go on unlocked
                if fd is not None:
                    os.close(fd)
                fd = None
        try:
            yield
        finally:
            if fd is not None:
                os.close(fd)  # drops the lock

    def _write_tmp(self) -> str:
        tmp = f"{self.path}.{uuid.uuid4().hex[:12]}.tmp"
        with open(tmp, "wb") as f:
            f.write(self._record())
        return tmp

    def _create_local(self) -> bool:
        """Publish a complete record at the lease path unless one is there (a hard link fails if it exists)."""
        tmp = self._write_tmp()
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _try_acquire_local(self) -> bool:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        if self._create_local():
            return True
        if is_live(self._read()):
            return False
        with self._locked():  # dead or expired: re-judge and break it with nobody else changing it meanwhile
            if is_live(self._read()):
                return False
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            return self._create_local()

    # -- object stores: write, then read back --------------------------------------------------------------------

    def _try_acquire_remote(self) -> bool:
        held = self._read()
        if is_live(held) and not self._mine(held):
            return False
        self.fs.pipe_file(self.path, self._record())
        time.sleep(0.05)
        return self._mine(self._read())

    # -- the lease's life ----------------------------------------------------------------------------------------

    def acquire(self) -> None:
        won = self._try_acquire_local() if self.local else self._try_acquire_remote()
        if not won:
            held = self._read() or {}
            until = time.strftime("%H:%M:%S", time.localtime(held.get("expires", 0)))
            raise ShardBusyError(f"{self.path.removesuffix(LEASE_SUFFIX)} is being processed by another run "
                                 f"({held.get('owner', '?')}, lease until {until})")
        self._thread = threading.Thread(target=self._renew_loop, name="lease", daemon=True)
        self._thread.start()

    def _renew(self) -> bool:
        """Extend our lease; False when it is no longer ours."""
        if not self.local:
            if not self._mine(self._read()):
                return False
            self.fs.pipe_file(self.path, self._record())
            return True
        with self._locked():
            if not self._mine(self._read()):
                return False
            tmp = self._write_tmp()
            os.replace(tmp, self.path)  # readers see the old record or the new one, never a partial one
            return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                if not self._renew():
                    return  # taken over after we stalled past the ttl: the merge keeps the output right
            except OSError:
                continue  # a passing storage error: try again at the next tick, the ttl allows two misses

    def check_held(self) -> None:
        """Raise ShardBusyError unless the lease is still ours: a fence before publishing. A run that stalled past
        the ttl may have lost it to another run, which then publishes the shard itself."""
        held = self._read()
        if not self._mine(held):
            raise ShardBusyError(f"{self.path.removesuffix(LEASE_SUFFIX)}: this run lost its lease "
                                 f"(to {(held or {}).get('owner', 'nobody')}) before publishing; nothing published")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._locked() if self.local else contextlib.nullcontext():
            if self._mine(self._read()):
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm(self.path)

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
