"""Safe streaming extraction of a tar archive into the volume (content type `archive`).

Refuses, before anything of that member is written: absolute names, `..` components, names that
land outside the target, symlinks or hard links pointing outside it, and device, FIFO or other
special files. The archive is read once, as a stream (`r|`), so it can come straight off the
network. The total of member sizes is bounded by the space available.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from importer.errors import FatalProcessingError

log = logging.getLogger(__name__)

_HAS_FILTERS = hasattr(tarfile, "fully_trusted_filter")


def _inside(root: Path, candidate: Path) -> bool:
    try:
        candidate.relative_to(root)
    except ValueError:
        return False
    return True


def _check_member(root: Path, member: tarfile.TarInfo) -> Path:
    name = PurePosixPath(member.name)
    if name.is_absolute() or member.name.startswith("/"):
        raise FatalProcessingError(f"archive member {member.name!r} has an absolute path; refusing")
    if ".." in name.parts:
        raise FatalProcessingError(f"archive member {member.name!r} climbs out with '..'; refusing")
    dest = Path(os.path.normpath(root / name))
    if not _inside(root, dest):
        raise FatalProcessingError(f"archive member {member.name!r} lands outside the volume")
    if member.issym():
        link = PurePosixPath(member.linkname)
        resolved = Path(os.path.normpath(dest.parent / link)) if not link.is_absolute() else None
        if resolved is None or not _inside(root, resolved):
            raise FatalProcessingError(
                f"archive member {member.name!r} links to {member.linkname!r}, outside the volume"
            )
    elif member.islnk():
        target = Path(os.path.normpath(root / member.linkname))
        if PurePosixPath(member.linkname).is_absolute() or not _inside(root, target):
            raise FatalProcessingError(
                f"archive member {member.name!r} hard-links {member.linkname!r}, outside the volume"
            )
    elif not (member.isfile() or member.isdir()):
        raise FatalProcessingError(
            f"archive member {member.name!r} is a device or special file; refusing"
        )
    # A directory on the way that is really a symlink could redirect the write; refuse that too.
    parent = dest.parent
    while parent != root and _inside(root, parent):
        if parent.is_symlink():
            raise FatalProcessingError(
                f"archive member {member.name!r} would be written through symlink {parent.name!r}"
            )
        parent = parent.parent
    return dest


def extract_tar(stream: BinaryIO, root: Path, *, limit: int, created: list[Path]) -> None:
    """Extract `stream` into `root`, recording in `created` each new top-level entry.

    `created` is filled as extraction goes, so a caller can remove a half-extracted archive.
    """
    root = root.resolve()
    total = 0
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                _check_member(root, member)
                total += max(member.size, 0)
                if total > limit:
                    raise FatalProcessingError(
                        f"archive content is larger than the {limit} bytes available; a larger "
                        "PVC is required"
                    )
                parts = PurePosixPath(member.name).parts
                # `tar -C dir -cf x.tar .` starts with "./": the root itself, nothing to record.
                if parts and (top := root / parts[0]) not in created and not top.exists():
                    created.append(top)
                # Ownership is not ours to keep (we run as the volume's user); modes are.
                member.uid = member.gid = os.getuid()
                member.uname = member.gname = ""
                if _HAS_FILTERS:  # our checks above already did what the "data" filter does
                    tar.extract(member, root, set_attrs=not member.issym(), filter="fully_trusted")
                else:  # pragma: no cover - Python builds without PEP 706
                    tar.extract(member, root, set_attrs=not member.issym())
                log.debug("extracted name=%s size=%d", member.name, member.size)
    except tarfile.TarError as err:
        raise FatalProcessingError(f"not a valid tar archive: {err}") from None


def remove_created(created: list[Path]) -> None:
    for path in created:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
