"""Each run has one owner: a lease file in the run's directory, `runs/<run_name>/lease.json`.

A job claims a run by creating the lease exclusively (O_CREAT|O_EXCL: of several claimants at
once, exactly one succeeds), holding its owner (the SLURM job id, `ARRAYID_TASKID` for an array
task, or `local-<pid>`), host, pid and a random token. While the run trains, a background thread
touches the file every HEARTBEAT_SECONDS; the file's modification time is the heartbeat. Another
launch or job skips a run whose lease is live ("running elsewhere"). A lease is not live when its
heartbeat stopped more than STALE_SECONDS ago (the job died without a word: SIGKILL, a lost node),
when its process is gone (same host and pid namespace only), or when its owner marked it failed
(the run ended without a finished record, e.g. the disk was full), and not to the same SLURM job
requeued (its SLURM_RESTART_COUNT grew: the earlier incarnation is gone). Such a lease may be taken
over: under a lock, the claimant writes its own lease to a temp file, checks once more that the
old one is the same dead lease, renames its file over it and reads it back to confirm that its
token won. The old owner, should it wake up, finds another token in the file: `holds()` turns
False, and RunBook.save refuses to write (critbatch.records.NotOwner).

Every claim, training, release and failure is appended to `runs/<run_name>/lease.log` (one JSON
object a line), the run's ownership history.

Clocks: the heartbeat is compared with this machine's clock; keep the nodes' clocks within a few
seconds of each other (NTP), far below STALE_SECONDS.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

LEASE_FILE = "lease.json"
HISTORY_FILE = "lease.log"
LOCK_FILE = ".lease.lock"
HEARTBEAT_SECONDS = 5.0
# A lease whose heartbeat is older than this is dead: 12 missed heartbeats. Independent of how
# long a training step takes (the heartbeat is a thread of its own), so a slow run stays owned.
STALE_SECONDS = 60.0
HELD, FAILED = "held", "failed"
_SIZE = 1024  # a lease file is padded to this size, so that marking it failed needs no new space


def owner_id() -> str:
    """Who is running: the SLURM array task (JOBID_TASKID), the SLURM job, or local-<pid>."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or f"local-{os.getpid()}"


def pid_namespace() -> int | None:
    """The pid namespace of this process (containers on one host may share a host name)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def restart_count() -> int:
    """How often SLURM requeued this job (0 when not under SLURM)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def _earlier_incarnation(seen: "LeaseInfo", owner: str) -> bool:
    """The lease of this very SLURM job before it was requeued: its process is gone."""
    return (seen.owner == owner and not owner.startswith("local-") and isinstance(seen.restart, int)
            and seen.restart < restart_count())


def _pid_gone(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, TypeError, OverflowError):
        return False
    return False


@dataclass
class LeaseInfo:
    """A lease as found on disk, by a reader that does not own it."""
    path: Path
    age: float            # seconds since the last heartbeat
    state: str            # held, failed, or unreadable (being written, or torn)
    owner: str | None = None
    host: str | None = None
    pid: int | None = None
    pidns: int | None = None
    token: str | None = None
    error: str | None = None
    restart: int | None = None   # SLURM_RESTART_COUNT of its job
    stale_after: float = STALE_SECONDS
    inode: int | None = None

    @property
    def fresh(self) -> bool:
        return self.age <= self.stale_after

    @property
    def process_gone(self) -> bool:
        """Its process, on this very host and in this pid namespace, no longer exists."""
        return (self.host == socket.gethostname() and self.pid is not None
                and self.pidns is not None and self.pidns == pid_namespace() and _pid_gone(self.pid))

    @property
    def live(self) -> bool:
        """Owned by a running job: not failed, heartbeat fresh, process not known to be gone."""
        return self.state != FAILED and self.fresh and not self.process_gone

    def describe(self) -> str:
        where = f"{self.owner or '?'} on {self.host or '?'}"
        if self.state == FAILED:
            return f"failed under {where}: {self.error}"
        return f"{where}, heartbeat {self.age:.0f} s ago"


def read_lease(run_dir: str | os.PathLike, stale_after: float = STALE_SECONDS) -> LeaseInfo | None:
    """The lease of the run in `run_dir`, or None when nobody holds one."""
    path = Path(run_dir) / LEASE_FILE
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            text = f.read()
    except FileNotFoundError:
        return None
    except NotADirectoryError:
        return None
    info = LeaseInfo(path=path, age=max(0.0, time.time() - stat.st_mtime), state="unreadable",
                     stale_after=stale_after, inode=stat.st_ino)
    try:
        data = json.loads(text)
    except ValueError:  # being written this instant, or its writer died mid-write
        return info
    if not isinstance(data, dict):
        return info
    info.state = FAILED if data.get("state") == FAILED else HELD
    for key in ("owner", "host", "pid", "pidns", "token", "error", "restart"):
        setattr(info, key, data.get(key))
    return info


def history(run_dir: str | os.PathLike) -> list[dict]:
    """The run's ownership history: every claim, takeover, training, release and failure."""
    try:
        lines = (Path(run_dir) / HISTORY_FILE).read_text().splitlines()
    except OSError:
        return []
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except ValueError:
            continue  # a line torn by a full disk
    return events


def _encode(data: dict) -> bytes:
    text = json.dumps(data).encode()
    return text + b" " * (_SIZE - len(text)) if len(text) < _SIZE else text


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@contextlib.contextmanager
def _takeover_lock(run_dir: Path):
    """Serialise takeovers of one run's lease (an flock, released if its holder dies). Where
    the file system has no locks, the re-check and read-back around the rename still hold."""
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
    except OSError:
        yield
        return
    try:
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)


class Lease:
    """A lease this process holds on one run. Take one with `Lease.acquire(run_dir)`."""

    def __init__(self, run_dir: Path, token: str, owner: str, inode: int, heartbeat: float):
        self.run_dir, self.path = run_dir, run_dir / LEASE_FILE
        self.token, self.owner, self.inode, self.heartbeat = token, owner, inode, heartbeat
        self._stop = threading.Event()
        self._lost = False
        self._done = False
        self._thread = threading.Thread(target=self._beat, name=f"lease {run_dir.name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ claiming
    @classmethod
    def acquire(cls, run_dir: str | os.PathLike, heartbeat: float = HEARTBEAT_SECONDS,
                stale_after: float = STALE_SECONDS) -> "Lease | None":
        """Claim the run in `run_dir`: a Lease, or None when a live owner holds it. Raises OSError
        when the lease cannot be written (e.g. the disk is full)."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        token, owner = secrets.token_hex(16), owner_id()
        data = {"owner": owner, "host": socket.gethostname(), "pid": os.getpid(), "pidns": pid_namespace(),
                "token": token, "acquired": time.time(), "state": HELD, "restart": restart_count()}
        for _ in range(3):  # a lease released between our create and our read: claim again
            inode = cls._create(run_dir, data)
            if inode is not None:
                lease = cls(run_dir, token, owner, inode, heartbeat)
                lease.log("acquire")
                return lease
            seen = read_lease(run_dir, stale_after)
            if seen is None:
                continue
            if seen.live and not _earlier_incarnation(seen, owner):
                return None
            return cls._take_over(run_dir, seen, data, heartbeat, stale_after)
        return None

    @staticmethod
    def _create(run_dir: Path, data: dict) -> int | None:
        path = run_dir / LEASE_FILE
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        try:
            _write_all(fd, _encode(data))
            os.fsync(fd)
            inode = os.fstat(fd).st_ino
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)  # an empty lease would look owned for STALE_SECONDS
            raise
        os.close(fd)
        return inode

    @classmethod
    def _take_over(cls, run_dir: Path, seen: LeaseInfo, data: dict, heartbeat: float,
                   stale_after: float) -> "Lease | None":
        path, token = run_dir / LEASE_FILE, data["token"]
        with _takeover_lock(run_dir):
            again = read_lease(run_dir, stale_after)
            if again is None:  # released meanwhile
                inode = cls._create(run_dir, data)
                if inode is None:
                    return None
                lease = cls(run_dir, token, data["owner"], inode, heartbeat)
                lease.log("acquire")
                return lease
            dead = not again.live or _earlier_incarnation(again, data["owner"])
            if not dead or again.inode != seen.inode or again.token != seen.token:
                return None  # its owner came back, or another claimant was quicker
            tmp = run_dir / f".{LEASE_FILE}.{token}.tmp"
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            try:
                _write_all(fd, _encode(data))
                os.fsync(fd)
                inode = os.fstat(fd).st_ino
            except BaseException:
                os.close(fd)
                tmp.unlink(missing_ok=True)
                raise
            os.close(fd)
            last = read_lease(run_dir, stale_after)  # re-check just before replacing it
            if last is None or last.inode != seen.inode or (last.live and not _earlier_incarnation(last, data["owner"])):
                tmp.unlink(missing_ok=True)
                return None
            os.rename(tmp, path)
        confirmed = read_lease(run_dir, stale_after)
        if confirmed is None or confirmed.token != token:
            return None
        lease = cls(run_dir, token, data["owner"], inode, heartbeat)
        lease.log("takeover", previous=seen.owner, previous_state=seen.state,
                  previous_heartbeat_age=round(seen.age, 1))
        return lease

    # ------------------------------------------------------------------ holding
    def holds(self) -> bool:
        """True while the lease file on disk is still this lease (nobody took the run over)."""
        if self._done or self._lost:
            return False
        try:
            with open(self.path, "rb") as f:
                inode = os.fstat(f.fileno()).st_ino
                text = f.read()
        except FileNotFoundError:
            return False
        except OSError:
            return not self._lost  # a transient read error: trust the heartbeat's last look
        if inode != self.inode:
            return False
        try:
            return json.loads(text).get("token") == self.token
        except (ValueError, AttributeError):
            return True  # only this owner rewrites its file in place

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            if not self.holds():
                self._lost = True
                return
            try:
                os.utime(self.path)
            except FileNotFoundError:
                self._lost = True
                return
            except OSError:
                pass  # try again at the next beat

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def log(self, event: str, **facts) -> None:
        """Append an event to the run's ownership history (best effort: a full disk loses it)."""
        entry = {"event": event, "owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                 "token": self.token, "time": round(time.time(), 3), **facts}
        try:
            with open(self.run_dir / HISTORY_FILE, "a") as f:
                f.write(json.dumps(entry) + "\n")
        except OSError:
            pass

    # ------------------------------------------------------------------ letting go
    def release(self) -> None:
        """The run's record is final: remove the lease (if it is still this one)."""
        self.stop_heartbeat()
        if self._done:
            return
        held = self.holds()
        self._done = True
        if held:
            self.path.unlink(missing_ok=True)
            self.log("release")

    def mark_failed(self, error: str) -> None:
        """The run ended without a finished record (its write failed, or the job stopped): say
        so in the lease, so that sweeps.status reports it failed and a relaunch may take it over
        at once. Rewritten in place, within the space the file already has; if even that fails,
        the lease is removed (the run is then reported stale, never running)."""
        self.stop_heartbeat()
        if self._done:
            return
        held = self.holds()
        self._done = True
        if not held:
            return
        data = {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(), "pidns": pid_namespace(),
                "token": self.token, "state": FAILED, "failed": time.time(), "error": None}
        room = _SIZE - len(json.dumps(data))
        data["error"] = error if len(json.dumps(error)) <= room else error[: max(0, room - 40)] + "..."
        try:
            fd = os.open(self.path, os.O_WRONLY)
            try:
                text = _encode(data)
                _write_all(fd, text)
                os.ftruncate(fd, len(text))
            finally:
                os.close(fd)
            os.utime(self.path, (0, 0))  # and no heartbeat: dead to every reader
        except OSError:
            self.path.unlink(missing_ok=True)
        self.log("failed", error=error)
