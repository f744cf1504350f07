"""Atomic file writes: a crash or a full disk never leaves a half-written file under the final name.

Writers of one folder take turns through a lock file beside it (`exclusive_lock`), and the one holding the
lock removes the temporaries that killed writers left (`remove_stale_temporaries`). Every OSError of a
write is re-raised as a `WriteError` naming the file or folder that could not be written.
"""
import contextlib
import errno
import fcntl
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from charlm.errors import CharlmError


class WriteError(OSError):
    """An OSError whose message names what could not be written (a bare ENOSPC from write or fsync names
    nothing); errno is kept."""

    def __init__(self, path: Path, reason: str, code: int | None = None):
        super().__init__(code, reason)
        self.path, self.reason = Path(path), reason

    def __str__(self) -> str:
        return f"could not write {self.path}: {self.reason}"


class LockedError(CharlmError):
    """Another process holds the lock on what this one was to write."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_pattern(name: str) -> re.Pattern:
    # tempfile's random part has no dot, so `.a.b.x1y2.tmp` (a temporary of `a.b`) is never one of `a`'s
    return re.compile(re.escape(f".{name}.") + r"[^.]+\.tmp")


def _is_path_or_temporary(path: Path, filename) -> bool:
    """Whether `filename` is `path`, one of its temporaries, or inside one of them."""
    first = Path(os.path.relpath(filename, path.parent)).parts[:1]
    return bool(first) and (first[0] == path.name or bool(_temporary_pattern(path.name).fullmatch(first[0])))


@contextlib.contextmanager
def _naming_errors(path: Path) -> Iterator[None]:
    """Re-raise an OSError as a WriteError naming `path`, with the file the error names unless that is
    `path` or a temporary of it (whose name means nothing to the user)."""
    try:
        yield
    except WriteError as e:
        if e.path == path or not _is_path_or_temporary(path, e.path):
            raise
        raise WriteError(path, e.reason, e.errno) from e
    except OSError as e:
        reason = e.strerror or str(e)
        if e.filename is not None and not _is_path_or_temporary(path, e.filename):
            reason += f": {e.filename}"
        raise WriteError(path, reason, e.errno) from e


def atomic_write(path: Path, write: Callable[[object], None], mode: str = "wb") -> None:
    """Call write(f) on a temporary file beside `path`, fsync it, then rename it over `path`."""
    path = Path(path)
    with _naming_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, mode) as f:
                os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp's 0600 would make the final file private
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w")


def lock_path(path: Path) -> Path:
    """The lock file of writes to `path`: .NAME.lock beside it."""
    path = Path(path)
    return path.parent / f".{path.name}.lock"


def _holder(lock: Path) -> str:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        if text := lock.read_text().strip():
            return text
    return "another process"


def _open_lock_file(lock: Path) -> int:
    try:  # O_NOFOLLOW: a symlink planted at the lock's name must not make us truncate the file it points to
        return os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as e:
        kind = ("a symlink" if lock.is_symlink() else
                "not a regular file" if lock.exists() and not lock.is_file() else None)
        raise WriteError(lock, f"it is {kind}, expected a lock file or nothing" if kind else e.strerror,
                         e.errno) from e


def _acquire(lock: Path, what: str, blocking: bool) -> int:
    """An open descriptor of `lock`, flock'ed. The holder removes the file on release, so a waiter that
    then gets the lock of a removed file opens the file anew."""
    while True:
        fd = _open_lock_file(lock)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not blocking:
                    raise LockedError(f"{what} is in use by {_holder(lock)} (lock file {lock}): expected no "
                                      f"other process to use it; wait for that one to end, or stop it") from None
                print(f"waiting for {what}: in use by {_holder(lock)} (lock file {lock})", file=sys.stderr)
                fcntl.flock(fd, fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.stat(lock, follow_symlinks=False)):
                    return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


@contextlib.contextmanager
def exclusive_lock(lock: Path, what: str, blocking: bool = True) -> Iterator[None]:
    """Hold an advisory lock (fcntl.flock) on the file `lock` for the block; `what` names what it guards in
    messages. While held, the file says who holds it (pid and host); it is removed on release, and the
    kernel releases the lock of a killed process. If another process holds it: wait (blocking=True, saying
    so on stderr), or raise LockedError naming the holder."""
    lock = Path(lock)
    fd = _acquire(lock, what, blocking)
    try:
        with _naming_errors(lock):
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # still held: no other process can have locked this file and expect it to stay
        os.close(fd)


def remove_stale_temporaries(directory: Path, name: str) -> list[Path]:
    """Delete the temporaries of `name` that killed writes left in `directory` (.NAME.<random>.tmp files
    and folders); returns them. Only safe while no other writer of `name` runs: hold its exclusive_lock."""
    pattern = _temporary_pattern(name)
    directory = Path(directory)
    stale = sorted(p for p in directory.iterdir() if pattern.fullmatch(p.name)) if directory.is_dir() else []
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return stale


def check_replaceable_dir(path: Path) -> None:
    """Refuse a `path` that exists but is not a real folder: a file or a symlink (to anything) there is the
    user's, and atomic_dir neither renames nor deletes it."""
    path = Path(path)
    kind = "a symlink" if path.is_symlink() else "not a folder" if path.exists() and not path.is_dir() else None
    if kind:
        raise WriteError(path, f"it is {kind}, expected a folder to replace or nothing; it is left as it is",
                         errno.EEXIST)


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` (a folder, or nothing), on
    failure it is removed. Concurrent writers of `path` take turns; the one writing first removes the
    temporaries of killed writers. The block should only write into the folder: an OSError in it is
    re-raised as a WriteError naming `path`."""
    path = Path(path)
    with _naming_errors(path):
        check_replaceable_dir(path)  # before the block's work, and again before the swap
        path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(lock_path(path), f"writing {path}"):
            remove_stale_temporaries(path.parent, path.name)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
            try:
                os.chmod(tmp, 0o777 & ~_umask())
                yield tmp
                for f in tmp.iterdir():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
                check_replaceable_dir(path)
                _swap_in(tmp, path)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise


def _swap_in(tmp: Path, path: Path) -> None:
    # An old folder is renamed aside, not deleted, before the new one takes its name: a crash between the
    # two renames leaves it whole (under the aside name), never neither.
    old = tmp.with_suffix(".old") if path.exists() else None
    if old is not None:
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:  # put the old folder back under its name
            os.replace(old, path)
        raise
    _fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old)


def pyplot():
    """matplotlib.pyplot on the Agg backend: figures render to files on machines without a display."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Write a matplotlib figure to `path` (PNG) atomically and close it."""
    atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"))
    pyplot().close(fig)
    return Path(path)
