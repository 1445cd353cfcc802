"""One driver per sweep: a lock file next to the sweep, held while `launch` or `resume` runs.

Two drivers of the same sweep delete each other's MLflow runs and race on its experiment
state, so the second is refused (exit 2) with one line naming the holder. A driver killed
with SIGKILL cannot remove its lock; the next driver on the same host sees that the
holder's process is gone (or its pid now belongs to another process) and takes the lock
over with a warning. A holder on another host cannot be checked from here: the message
names the file to delete once that driver is known to be dead.

Local storage gets an atomic create (O_EXCL). Cloud storage has no exclusive create in
pyarrow's filesystems: there the check and the write are two steps, which catches a second
driver started by hand but not two started in the same instant.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from sweeper import storage as st
from trainables.errors import ConfigError


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: enough to tell a live driver from a dead one on the same host."""

    host: str
    pid: int
    start_ticks: int | None  # the process's start time (/proc), so a reused pid is not "alive"
    since: str
    command: str

    @classmethod
    def me(cls) -> Holder:
        return cls(host=socket.gethostname(), pid=os.getpid(),
                   start_ticks=process_start_ticks(os.getpid()),
                   since=time.strftime("%Y-%m-%d %H:%M:%S"),
                   command=" ".join(["caat-sweep", *sys.argv[1:]])[:200])

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.since} ({self.command})"


def process_start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks); None where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])


def is_alive(holder: Holder) -> bool | None:
    """True/False for a holder on this host; None when it runs elsewhere (unknowable)."""
    if holder.host != socket.gethostname():
        return None
    if holder.pid <= 0:
        return False  # never os.kill(-1 or 0, ...): those address process groups
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    if holder.start_ticks is not None:
        return process_start_ticks(holder.pid) == holder.start_ticks
    return True


def driver_of(storage: str, name: str) -> tuple[Holder | None, bool | None]:
    """Who holds sweep `name`'s lock, and whether it is alive (None: on another host)."""
    path = lock_path(storage, name)
    try:
        holder = Holder(**json.loads(st.read_bytes(path)))
    except FileNotFoundError:
        return None, False
    except (OSError, ValueError, TypeError):
        return None, False  # unreadable: killed mid-write
    return holder, is_alive(holder)


def lock_path(storage: str, name: str) -> str:
    return st.join(storage, f"{name}.lock")


class SweepLock:
    """`with SweepLock(storage, name):` around everything a driver does to a sweep."""

    def __init__(self, storage: str, name: str):
        self.storage, self.name = storage, name
        self.path = lock_path(storage, name)
        self.holder = Holder.me()
        self._held = False
        self._made_dir: Path | None = None  # the storage directory, when we created it

    def __enter__(self) -> SweepLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        for _ in range(2):  # a second try after removing a stale lock
            if self._create():
                self._held = True
                return
            other = self._read()
            if other is None:
                continue  # removed between our create and our read: try again
            alive = is_alive(other)
            if alive is False:
                print(f"warning: sweep {self.name}: removing the stale lock of a driver that "
                      f"is gone ({other.describe()})", file=sys.stderr)
                self._remove()
                continue
            hint = "" if alive else f"; if that driver is dead, delete {self.path}"
            raise ConfigError(f"sweep {self.name!r}: another driver is running it "
                              f"({other.describe()}); wait for it or stop it{hint}")
        raise ConfigError(f"sweep {self.name!r}: cannot take the lock {self.path}")

    def release(self) -> None:
        if self._held:
            self._held = False
            self._remove()
        if self._made_dir is not None:  # a refused launch leaves no empty storage behind
            with contextlib.suppress(OSError):
                self._made_dir.rmdir()

    # -- the file

    def _create(self) -> bool:
        data = json.dumps(asdict(self.holder)).encode()
        if st.is_uri(self.path) and not self.path.startswith("file://"):
            if st.exists(self.path):
                return False
            st.write_bytes(self.path, data)
            return True
        path = Path(self.path.removeprefix("file://"))
        if not path.parent.exists():
            path.parent.mkdir(parents=True)
            self._made_dir = path.parent
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True

    def _read(self) -> Holder | None:
        try:
            return Holder(**json.loads(st.read_bytes(self.path)))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):
            # Unreadable (a driver killed mid-write): nobody can be holding it properly.
            return Holder(host=socket.gethostname(), pid=-1, start_ticks=None, since="?",
                          command="unreadable lock file")

    def _remove(self) -> None:
        st.remove(self.path)
