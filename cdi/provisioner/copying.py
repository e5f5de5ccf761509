"""Copies of local volumes for snapshots, restores and clones: reflink when the file system can
share extents (btrfs, XFS with reflink, bcachefs, ...), a sparse copy otherwise.

`copy_data` runs GNU `cp -a --reflink=auto --sparse=always` as a child process: cp tries the
FICLONE ioctl first and falls back to a copy that keeps holes (and turns runs of zeros into
holes), preserving modes, times and xattrs, which is exactly the semantics wanted and would be a
page of ioctl and SEEK_DATA code to redo. The child is awaited, so the event loop keeps serving,
and killed and reaped if the caller is cancelled.

A copy is made at a hidden sibling (`.partial-<name>`) and renamed into place when complete, so
the destination either does not exist or holds a whole copy: a crash mid-copy leaves only a
partial that the next attempt removes first.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

CP_FLAGS: Final = ("-a", "--reflink=auto", "--sparse=always")
#: linux/fs.h FICLONE = _IOW(0x94, 9, int): the same number on every Linux architecture.
FICLONE: Final = 0x40049409
MIB: Final = 1 << 20


class CopyError(OSError):
    """`cp` failed: the message is its stderr. An OSError, so callers retry it like one."""


def partial_path(dst: Path) -> Path:
    return dst.with_name(f".partial-{dst.name}")


def remove_path(path: Path) -> None:
    """Remove a file or a directory tree; nothing there is fine."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        path.unlink()


def _sizes(path: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of a file or a tree: the rate that means something for
    a sparse copy is the allocated one."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    stats = [f.stat(follow_symlinks=False) for f in files if not f.is_symlink()]
    return sum(st.st_size for st in stats), sum(st.st_blocks * 512 for st in stats)


async def copy_data(src: Path, dst: Path) -> None:
    """Copy `src` (a directory or a file) to `dst`, which must not exist yet."""
    tmp = partial_path(dst)
    is_dir = await asyncio.to_thread(_prepare, src, dst, tmp)
    # `SRC/.` into an existing DST copies the directory's contents and its own attributes.
    args = (f"{src}/.", f"{tmp}/") if is_dir else (str(src), str(tmp))
    log.info("copying src=%s dst=%s", src, dst)
    started = time.monotonic()
    try:
        await _run_cp(*CP_FLAGS, *args)
        await asyncio.to_thread(_commit, tmp, dst)
    except Exception:
        # Give the space back now; a cancelled copy's partial goes on the next attempt.
        with contextlib.suppress(OSError):
            await asyncio.to_thread(remove_path, tmp)
        raise
    seconds = time.monotonic() - started
    size, allocated = await asyncio.to_thread(_sizes, dst)
    log.info(
        "copied src=%s dst=%s bytes=%d allocated=%d seconds=%.3f mib_per_s=%.1f",
        src,
        dst,
        size,
        allocated,
        seconds,
        allocated / MIB / seconds if seconds > 0 else 0.0,
    )


def _prepare(src: Path, dst: Path, tmp: Path) -> bool:
    """Make room for the copy at `tmp`; whether `src` is a directory."""
    if dst.exists():
        raise FileExistsError(errno.EEXIST, "copy destination exists", str(dst))
    is_dir = src.is_dir()
    if not is_dir and not src.is_file():
        raise FileNotFoundError(errno.ENOENT, "nothing to copy", str(src))
    remove_path(tmp)  # what a crashed attempt left
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp.mkdir(mode=0o775)
    return is_dir


def _commit(tmp: Path, dst: Path) -> None:
    """Make the copy durable, then visible under its real name: a snapshot marked ready must
    not turn out empty after a power cut."""
    _fsync(tmp)
    if tmp.is_dir():
        for base, dirs, files in os.walk(tmp):
            for name in (*files, *dirs):
                entry = Path(base, name)
                if not entry.is_symlink() and (entry.is_file() or entry.is_dir()):
                    _fsync(entry)
    os.rename(tmp, dst)
    _fsync(dst.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def _run_cp(*args: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "cp",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, stderr = await proc.communicate()
    except BaseException:  # cancelled: no copy may outlive the reconcile that wanted it
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        message = stderr.decode(errors="replace").strip() or f"exit status {proc.returncode}"
        raise CopyError(errno.EIO, f"cp failed: {message}")


def reflink_supported(directory: Path) -> bool:
    """Whether files in `directory` can share extents (FICLONE works), probed on two small
    temporary files. For the start-up log line: copies work either way, so any failure of the
    probe itself just means "no"."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with (
            tempfile.NamedTemporaryFile(dir=directory, prefix=".reflink-probe-") as src,
            tempfile.NamedTemporaryFile(dir=directory, prefix=".reflink-probe-") as dst,
        ):
            src.write(b"\0" * 4096)
            src.flush()
            fcntl.ioctl(dst.fileno(), FICLONE, src.fileno())
    except OSError:
        return False
    return True
