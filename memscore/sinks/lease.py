"""One writer per output folder: the lease a scoring run holds on ``--output`` for its whole life.

Two runs writing into one output double its rows (each scores every row and commits its own
files), and a ``--resume`` started while the first run is still going does the same. So a run
first takes the output's lease, ``OUTPUT/_memscore.lease``: a small JSON naming the run (its id,
host, pid and start time), created only if no such file exists, kept fresh by a heartbeat while
the run lives, and deleted when the run ends, however it ends. A second writer is refused with
one line naming the holder and the age of its last heartbeat.

How "created only if absent" and "refreshed only while still ours" are made atomic:

- **A local (or mounted) folder**: ``open(O_CREAT | O_EXCL)`` creates the file or fails, on one
  machine and on NFS (v3 and later). The heartbeat sets the file's mtime through the run's open
  descriptor: a lease taken over since (a new file under the same name) is not touched, and the
  run sees it has lost its lease (the name's inode is no longer its own).
- **S3**: a PUT with ``If-None-Match: *`` creates the object or fails with 412 (AWS S3 since
  August 2024; moto 5.2 honours it, checked by the tests); the heartbeat is a PUT with
  ``If-Match: <the ETag of our last write>`` (AWS S3 since November 2024, moto too), so it
  fails once anyone else has written the lease. A storage that ignores ``If-None-Match`` (some
  S3-compatible stores) is detected at once, by a second conditional create that must fail: the
  run then goes on with a warning that two writers are not excluded there, and ``--resume``
  repairs a doubled output (``resume.drop_duplicate_rows``).

A lease whose holder is gone is taken over by ``--resume`` (or ``--overwrite``), never by a
plain run (which is refused: the folder holds another run's work):

- at once when the holder ran on this host and its process no longer exists (pid and the
  process's start time, so a reused pid is not mistaken for the holder);
- otherwise once its heartbeat is older than ``STALE_AFTER_S`` (see there for the bound).

The takeover itself is a compare-and-swap (S3: ``If-Match`` on the stale lease's ETag; locally:
an exclusive marker file per stale lease), so of two ``--resume`` racing for one stale lease
exactly one wins.

The holder fences itself: a heartbeat that has not succeeded for ``FENCE_AFTER_S`` (half the
stale bound), or that finds the lease no longer its own, stops the run (``lost`` says why; the
main thread is interrupted), so the holder has stopped writing before anyone may take over.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from memscore import storage
from memscore.errors import MemscoreError, first_line

__all__ = [
    "LEASE_FILE",
    "HEARTBEAT_S",
    "STALE_AFTER_S",
    "FENCE_AFTER_S",
    "Lease",
    "LeaseHolder",
    "acquire_lease",
    "read_holder",
]

LEASE_FILE = "_memscore.lease"
#: Seconds between heartbeats.
HEARTBEAT_S = 15.0
#: A heartbeat older than this is a holder that is gone. Five minutes: one heartbeat on S3 is a
#: PUT that memscore's bounded client gives up on within about 40 s (3 attempts, 10 s to
#: connect, 20 s to read), so a live holder refreshes at least every ~55 s even while S3 is
#: slow; the holder stops itself after FENCE_AFTER_S without a refresh; and the bound leaves
#: a few minutes for clocks that disagree (the age is this host's clock minus the storage's
#: modification time). A killed run on this host is taken over at once, without waiting.
STALE_AFTER_S = 300.0
#: The holder stops its run after this long without a successful heartbeat: half the stale
#: bound, so it stops before another run may take the lease over.
FENCE_AFTER_S = STALE_AFTER_S / 2
#: The lease's own S3 client: few attempts and short timeouts, so one heartbeat cannot hang
#: for minutes inside botocore's and s3fs's retry layers.
_S3_CLIENT = {
    "config_kwargs": {
        "retries": {"max_attempts": 3, "mode": "standard"},
        "connect_timeout": 10,
        "read_timeout": 20,
    }
}


class _Conflict(Exception):
    """A conditional create or replace lost: someone else's lease is there."""


@dataclass(frozen=True)
class LeaseHolder:
    """Who holds (or held) an output's lease, as its lease file says, and how old it is."""

    run_id: str
    host: str
    pid: int
    pid_started: str | None
    started_at: str
    age_s: float  # since the holder's last heartbeat, by this host's clock
    token: Any  # what a compare-and-swap needs: (S3) the ETag, (local) (device, inode, mtime)

    def describe(self) -> str:
        return (
            f"run {self.run_id} on host {self.host}, pid {self.pid}, started "
            f"{self.started_at}; last heartbeat {_ago(self.age_s)}"
        )

    def gone(self) -> bool:
        """Whether the holder no longer runs: its process is gone from this host, or its
        heartbeat is older than ``STALE_AFTER_S``."""
        if (
            self.host == socket.gethostname()
            and self.pid > 0
            and not _process_alive(self.pid, self.pid_started)
        ):
            return True
        return self.age_s > STALE_AFTER_S


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _process_started(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (``/proc/PID/stat`` field
    22), which tells a process from a later one given the same pid; None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[19].decode()
    except (OSError, IndexError):
        return None


def _process_alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, another user's
    if started is None:
        return True
    now = _process_started(pid)
    return now is None or now == started


def _record(run_id: str) -> bytes:
    pid = os.getpid()
    return (
        json.dumps(
            {
                "run_id": run_id,
                "host": socket.gethostname(),
                "pid": pid,
                "pid_started": _process_started(pid),
                "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "what": "memscore holds this output while a run writes it; see docs/reliability.md",
            },
            indent=1,
        )
        + "\n"
    ).encode()


def _holder(data: bytes, modified: float, token: Any) -> LeaseHolder:
    try:
        record = json.loads(data)
    except ValueError:  # not memscore's format: judged by its age alone
        record = {}
    return LeaseHolder(
        run_id=str(record.get("run_id", "?")),
        host=str(record.get("host", "?")),
        pid=int(record.get("pid", -1)),
        pid_started=record.get("pid_started"),
        started_at=str(record.get("started_at", "?")),
        age_s=time.time() - modified,
        token=token,
    )


# ----------------------------------------------------------------------------- the two stores
class _LocalStore:
    """A lease file in a local or mounted folder."""

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, LEASE_FILE)
        self.descriptor: int | None = None
        self.inode: tuple[int, int] | None = None

    def create(self, data: bytes) -> None:
        """Written whole under a temporary name, then linked to the lease's name: ``link``
        fails when the name exists, so the lease appears complete or not at all."""
        fd, temporary = self._write_aside(data)
        try:
            os.link(temporary, self.path)
        except FileExistsError:
            os.close(fd)
            raise _Conflict() from None
        finally:
            os.unlink(temporary)
        self._hold(fd)

    def _write_aside(self, data: bytes) -> tuple[int, str]:
        temporary = f"{self.path}.tmp-{uuid.uuid4().hex[:12]}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(temporary)
            raise
        return fd, temporary

    def _hold(self, fd: int) -> None:
        if self.descriptor is not None:
            os.close(self.descriptor)
        st = os.fstat(fd)
        self.descriptor, self.inode = fd, (st.st_dev, st.st_ino)

    def read(self) -> LeaseHolder | None:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read(65536)
        except FileNotFoundError:
            return None
        return _holder(data, st.st_mtime, (st.st_dev, st.st_ino, st.st_mtime_ns))

    def replace(self, stale: LeaseHolder, data: bytes) -> None:
        """Take over ``stale``: of all contenders, the one that creates the marker named after
        the stale lease's inode wins; it then checks that the lease is still that one."""
        device, inode, _ = stale.token
        marker = f"{self.path}.takeover-{device}-{inode}"
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            raise _Conflict() from None
        os.close(fd)
        try:
            now = self.read()
            if now is None or now.token != stale.token:
                raise _Conflict()
            fd, temporary = self._write_aside(data)
            try:
                os.replace(temporary, self.path)
            except BaseException:
                os.close(fd)
                os.unlink(temporary)
                raise
            self._hold(fd)
        finally:
            os.unlink(marker)

    def refresh(self) -> bool:
        """Touch our lease file; False when the name no longer is our file."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        if (st.st_dev, st.st_ino) != self.inode:
            return False
        os.utime(self.descriptor)
        return True

    def delete(self) -> None:
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self.inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        if self.descriptor is not None:
            os.close(self.descriptor)
            self.descriptor = None

    def ignores_conditions(self, data: bytes) -> bool:
        return False  # O_EXCL is never ignored by a local filesystem


class _S3Store:
    """A lease object on S3, written with conditional PUTs."""

    def __init__(self, output: str, storage_options: Mapping[str, Any]):
        # the lease's own client (bounded retries), not the cached one the run reads with
        options = {**_S3_CLIENT, **dict(storage_options), "skip_instance_cache": True}
        self.fs, folder = storage.url_to_fs(output, options)
        self.fs.retries = 1  # s3fs's own retry loop (a class attribute) on top of botocore's
        self.bucket, _, prefix = folder.rstrip("/").partition("/")
        self.key = f"{prefix}/{LEASE_FILE}" if prefix else LEASE_FILE
        self.etag: str | None = None
        self.data = b""

    def _put(self, data: bytes, **condition) -> str:
        try:
            response = self.fs.call_s3(
                "put_object", Bucket=self.bucket, Key=self.key, Body=data, **condition
            )
        except Exception as exc:
            if _precondition_failed(exc):
                raise _Conflict() from None
            raise
        return response["ETag"]

    def create(self, data: bytes) -> None:
        self.etag, self.data = self._put(data, IfNoneMatch="*"), data

    def read(self) -> LeaseHolder | None:
        try:
            response = self.fs.call_s3("get_object", Bucket=self.bucket, Key=self.key)
        except FileNotFoundError:
            return None
        from fsspec.asyn import sync

        data = sync(self.fs.loop, response["Body"].read)
        modified = response["LastModified"].timestamp()
        return _holder(data, modified, response["ETag"])

    def replace(self, stale: LeaseHolder, data: bytes) -> None:
        self.etag, self.data = self._put(data, IfMatch=stale.token), data

    def refresh(self) -> bool:
        try:
            self.etag = self._put(self.data, IfMatch=self.etag)
        except _Conflict:
            return False
        return True

    def delete(self) -> None:
        # Deleted only while it is ours: S3's conditional DELETE (If-Match) is recent and not
        # everywhere, so the ETag is compared first; a takeover in between needs the lease to
        # have gone stale, which a live holder's heartbeat prevents.
        holder = self.read()
        if holder is not None and holder.token == self.etag:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key)

    def ignores_conditions(self, data: bytes) -> bool:
        try:
            self.etag = self._put(data, IfNoneMatch="*")
        except _Conflict:
            return False
        return True


def _precondition_failed(exc: BaseException) -> bool:
    """Whether an s3fs/botocore error is S3's 412 PreconditionFailed (a conditional PUT lost);
    s3fs turns it into an OSError (EINVAL) whose cause is botocore's ClientError."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 5:
        response = getattr(current, "response", None)
        if isinstance(response, dict):
            error = response.get("Error") or {}
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            return error.get("Code") in (
                "PreconditionFailed",
                "ConditionalRequestConflict",
            ) or status in (409, 412)
        current, seen = current.__cause__ or current.__context__, seen + 1
    return isinstance(exc, FileExistsError) or "pre-condition" in str(exc).lower()


# -------------------------------------------------------------------------------------- lease
class Lease:
    """An output's lease, held by this process; ``release`` it when the run ends.

    Attributes:
        output: the output folder.
        run_id: this run's id (also recorded in the run's summary).
        took_over: the holder whose lease this run took over, or None.
        unconditional: the storage ignored a conditional create (two writers not excluded).
        lost: why the lease was lost while the run went on (None while it holds).
    """

    def __init__(
        self,
        output: str,
        store,
        run_id: str,
        took_over: LeaseHolder | None,
        unconditional: bool,
        created_folder: str | None,
    ):
        self.output = output
        self.run_id = run_id
        self.took_over = took_over
        self.unconditional = unconditional
        self.lost: str | None = None
        self._store = store
        self._created_folder = created_folder
        self._stop = threading.Event()
        self._last_ok = time.monotonic()
        self._interrupt_main = False
        self._thread = threading.Thread(target=self._beat, name="memscore-lease", daemon=True)
        self._thread.start()

    def stop_run_when_lost(self, enabled: bool = True) -> None:
        """Interrupt the main thread (as Ctrl-C does) when the lease is lost, so a run that
        can no longer prove it is the only writer stops writing."""
        self._interrupt_main = enabled

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                ours = self._store.refresh()
            except Exception as exc:  # the storage is slow or away: fence if it lasts
                silent = time.monotonic() - self._last_ok
                if silent >= FENCE_AFTER_S:
                    self._lose(
                        f"its lease could not be refreshed for {silent:.0f} s "
                        f"({first_line(exc)[:200]})"
                    )
                    return
                continue
            if not ours:
                self._lose("its lease was taken over by another run")
                return
            self._last_ok = time.monotonic()

    def _lose(self, why: str) -> None:
        self.lost = why
        if self._interrupt_main:
            import _thread

            _thread.interrupt_main()

    def release(self) -> None:
        """Stop the heartbeat and delete the lease file if it is still ours; idempotent.
        A folder this run created and left empty goes too."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=60)
        try:
            self._store.delete()
        except Exception:
            pass  # a stale lease is taken over later; never fail a run's ending for it
        if self._created_folder:
            try:
                os.rmdir(self._created_folder)  # only when empty
            except OSError:
                pass

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def _store_for(output: str, storage_options: Mapping[str, Any]):
    if not storage.is_url(output) or output.startswith("file://"):
        return _LocalStore(output[len("file://") :] if output.startswith("file://") else output)
    protocol = output.split("://", 1)[0].lower()
    if protocol in ("s3", "s3a"):
        return _S3Store(output, storage_options)
    raise MemscoreError(
        f"--output {output}: memscore can hold a lease (one writer per output) "
        f"only on local folders and S3, not {protocol}://"
    )


def read_holder(
    output: str, storage_options: Mapping[str, Any] | None = None
) -> LeaseHolder | None:
    """Who holds ``output``'s lease now, or None.

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> read_holder(folder) is None
        True
        >>> with acquire_lease(folder) as lease:
        ...     holder = read_holder(folder)
        ...     holder.run_id == lease.run_id, holder.gone()
        (True, False)
        >>> read_holder(folder) is None
        True
    """
    return _store_for(output, dict(storage_options or {})).read()


def acquire_lease(
    output: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    take_over: bool = False,
    run_id: str | None = None,
) -> Lease:
    """Take ``output``'s lease for this process, or raise ``MemscoreError`` naming its holder.

    Args:
        output: the output folder (local, ``file://`` or ``s3://``); a local one is created.
        storage_options: fsspec options for S3.
        take_over: take over a lease whose holder is gone (``--resume``, ``--overwrite``);
            without it such a lease is refused too, with the hint to resume.
        run_id: this run's id (default: a new random one).

    Returns:
        The ``Lease``; the caller ``release``s it (or uses it as a context manager).
    """
    options = dict(storage_options or {})
    run_id = run_id or uuid.uuid4().hex[:16]
    data = _record(run_id)
    created_folder = None
    try:
        store = _store_for(output, options)
        if isinstance(store, _LocalStore) and not os.path.isdir(store.folder):
            os.makedirs(store.folder, exist_ok=True)
            created_folder = store.folder  # removed again if the run leaves it empty
        took_over = None
        for _ in range(3):  # a holder releasing as we look: look again
            try:
                store.create(data)
                break
            except _Conflict:
                pass
            holder = store.read()
            if holder is None:
                continue
            if not holder.gone():
                raise MemscoreError(
                    f"--output {output} is being written by another memscore run "
                    f"({holder.describe()}); wait for it to finish, or choose another folder"
                )
            if not take_over:
                raise MemscoreError(
                    f"--output {output} holds the lease of a memscore run that is gone "
                    f"({holder.describe()}); give --resume to finish its work"
                )
            try:
                store.replace(holder, data)
            except _Conflict:
                now = store.read()
                raise MemscoreError(
                    f"--output {output}: another memscore run took over the stale lease first"
                    + (f" ({now.describe()})" if now else "")
                    + "; wait for it to finish"
                ) from None
            took_over = holder
            break
        else:
            raise MemscoreError(f"--output {output}: the lease kept changing hands; try again")
        unconditional = store.ignores_conditions(data)
    except MemscoreError:
        if created_folder:
            _remove_empty(created_folder)
        raise
    except PermissionError as exc:
        raise MemscoreError(f"--output {output}: access denied: {first_line(exc)}") from None
    except OSError as exc:
        if created_folder:
            _remove_empty(created_folder)
        reason = (
            os.strerror(exc.errno)
            if exc.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT)
            else first_line(exc)
        )
        raise MemscoreError(f"--output {output} is not writable: {reason}") from None
    except Exception as exc:
        raise MemscoreError(f"--output {output} is not writable: {first_line(exc)}") from None
    return Lease(output, store, run_id, took_over, unconditional, created_folder)


def _remove_empty(folder: str) -> None:
    try:
        os.rmdir(folder)
    except OSError:
        pass
