"""Names, paths and small readings of objects shared by the local provisioner's modules.

Owns where local data lives (`<root>/volumes/<pv name>`, `<root>/snapshots/<content name>`) and
the one rule for trusting a path: data is only ever read or removed at the path derived from an
object's name, and only when the object agrees with it (`local_data_path`). No I/O here.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from cdi.api import VolumeMode
from cdi.api.groups import LOCAL_PROVISIONER

Obj = dict[str, Any]

PROVISIONER: Final = LOCAL_PROVISIONER
COMPONENT: Final = "cdi-local-provisioner"
PROVISIONED_BY: Final = "pv.kubernetes.io/provisioned-by"
MANAGED_BY: Final = "app.kubernetes.io/managed-by"


def volumes_dir(root: Path) -> Path:
    """Where every volume of this provisioner lives."""
    return root / "volumes"


def snapshots_dir(root: Path) -> Path:
    """Where every snapshot's data lives, one entry per VolumeSnapshotContent."""
    return root / "snapshots"


def pv_name_for(pvc: Obj) -> str:
    return f"pvc-{pvc['metadata']['uid']}"


def volume_path(pv: Obj) -> Path | None:
    """The local path of a PV's data (`spec.local.path` or `spec.hostPath.path`), if it has one.

    For the node agent: a directory (Filesystem) or a file (Block, `spec.volumeMode`)."""
    spec = pv.get("spec") or {}
    for source in ("local", "hostPath"):
        path = (spec.get(source) or {}).get("path")
        if path:
            return Path(path)
    return None


def is_ours(pv: Obj) -> bool:
    annotations_ = (pv.get("metadata") or {}).get("annotations") or {}
    return bool(annotations_.get(PROVISIONED_BY) == PROVISIONER)


def safe_name(name: object) -> bool:
    """A name that is one path component (object names are, but a hand-made one is checked)."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name


def local_data_path(root: Path, pv: Obj) -> Path | None:
    """The data of one of our PVs, or None when the PV is not ours or points elsewhere (a
    hand-made PV claiming to be ours must not point us at /home)."""
    name = (pv.get("metadata") or {}).get("name")
    if not is_ours(pv) or not safe_name(name):
        return None
    expected = volumes_dir(root) / str(name)
    return expected if volume_path(pv) == expected else None


def key_of(obj: Obj) -> str:
    md = obj.get("metadata") or {}
    ns = md.get("namespace")
    return f"{ns}/{md.get('name')}" if ns else str(md.get("name"))


def request_of(pvc: Obj) -> str | None:
    spec = pvc.get("spec") or {}
    value = ((spec.get("resources") or {}).get("requests") or {}).get("storage")
    return str(value) if value is not None else None


def volume_mode(obj: Obj) -> VolumeMode:
    """A PVC's or PV's volume mode; Kubernetes defaults an unset one to Filesystem."""
    mode = (obj.get("spec") or {}).get("volumeMode")
    return VolumeMode.BLOCK if mode == VolumeMode.BLOCK else VolumeMode.FILESYSTEM


def is_block(obj: Obj) -> bool:
    return volume_mode(obj) is VolumeMode.BLOCK


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
