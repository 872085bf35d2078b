"""Atomic file writes and directory locks: the one helper every writer of the project uses.

    from lafn_lightning.files import atomic_write, locked
    with locked(cache_dir):                     # exclusive fcntl lock on cache_dir/.lock
        atomic_write(cache_dir / "manifest.json", text)

A file is written to a temporary name beside its target, fsynced and renamed over it, so a
reader (or a crash) sees either the old file or the new one, never a mix.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

TMP_SUFFIX = ".tmp"
LOCK_NAME = ".lock"


class LockTimeout(RuntimeError):
    """A lock could not be taken within the timeout."""


class NotWritable(ValueError):
    """A place a command will write to cannot take the write (a ValueError: the CLI prints it as
    one line, exit 2, before any compute)."""


def check_writable(target: str | os.PathLike, *, kind: str = "file", need_bytes: int = 0,
                   what: str = "output") -> None:
    """Raise :class:`NotWritable` now if ``target`` (a file, or with ``kind="dir"`` a directory,
    either possibly not created yet) could not be written: a directory where a file is expected
    (or the reverse), a read-only place, or less than ``need_bytes`` free there.

        check_writable("runs/results.json", what="--output")
        check_writable("edit_cache", kind="dir", need_bytes=1 << 20, what="cache_dir")
    """
    target = Path(target)
    if kind == "file" and target.is_dir():
        raise NotWritable(f"{what} {target} is a directory; give a file path")
    if kind == "dir" and target.exists() and not target.is_dir():
        raise NotWritable(f"{what} {target} exists and is not a directory")
    base = target if kind == "dir" else target.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise NotWritable(f"{what} {target}: {base} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".lafn-probe-", suffix=TMP_SUFFIX)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise NotWritable(f"{what} {target}: cannot write in {base} ({e.strerror or e})") from None
    free = shutil.disk_usage(base).free
    if free < need_bytes:
        raise NotWritable(f"{what} {target}: only {free:,} bytes free on {base}, {need_bytes:,} needed")


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory (makes a rename inside it durable); ignored where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def naming(path: str | os.PathLike) -> Iterator[None]:
    """Give an OSError raised inside that names no file (a full disk at ``write`` or ``fsync``)
    ``path`` as its file, so that its one-line message says where.

        with naming(log), open(log, "a") as f:
            f.write(line)                 # OSError: [Errno 28] No space left on device: 'log'
    """
    try:
        yield
    except OSError as e:
        if e.filename is None and e.strerror is not None:   # OSError("text") keeps its text
            e.filename = str(path)
        raise


def tmp_path(final: str | os.PathLike) -> Path:
    """A unique temporary name beside ``final`` (hidden, ends in ``.tmp``)."""
    final = Path(final)
    return final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")


@contextlib.contextmanager
def atomic_output(final: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temporary file for writing; on success it is fsynced and renamed to ``final``,
    on error it is removed and ``final`` is left untouched (an OSError names ``final``:
    :func:`naming`)."""
    final = Path(final)
    tmp = tmp_path(final)
    try:
        with naming(final):
            with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(final.parent)


def atomic_write(final: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (bytes, or text as UTF-8) to ``final`` atomically."""
    with atomic_output(final, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


@contextlib.contextmanager
def locked(directory: str | os.PathLike, *, exclusive: bool = True, timeout: float | None = 600.0,
           name: str = LOCK_NAME) -> Iterator[None]:
    """Hold an fcntl lock on ``directory/name`` (the kernel drops it if the holder dies).

    A shared lock on a read-only directory is a no-op (nobody can be writing through it).
    Raises :class:`LockTimeout` after ``timeout`` seconds (None: wait forever).
    """
    lock_path = Path(directory) / name
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if not exclusive and e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            yield
            return
        raise OSError(e.errno, f"cannot open lock file {lock_path}: {e.strerror}") from None
    try:
        op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.002
        while True:
            try:
                fcntl.flock(fd, op | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() > deadline:
                    raise LockTimeout(f"timed out after {timeout}s waiting for lock {lock_path}") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def complete_lines(path: str | os.PathLike) -> list[str]:
    """The complete lines of an append-only log; a partial last line (a crash while writing) is
    cut off the file. Splits on "\\n" only (texts may hold U+2028, which ``splitlines`` breaks on)."""
    path = Path(path)
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        raw = raw[: raw.rfind(b"\n") + 1]
        with path.open("r+b") as f:
            f.truncate(len(raw))
    return [line for line in raw.decode("utf-8").split("\n") if line.strip()]


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line to a log and make it durable (flush + fsync) before returning."""
    with naming(path), Path(path).open("a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())
