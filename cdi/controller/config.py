"""The effective configuration: CDIConfig status from its spec, StorageProfile status (§8.1-8.2).

Owns the rules that turn what an administrator wrote into what every other reconciler reads:

* `cdiconfig_status(spec, storage_classes)`: the CDIConfig `status` CDI's config controller
  writes: `filesystemOverhead` (a global value and one for *every* StorageClass, so readers never
  fall back themselves), `scratchSpaceStorageClass` (only when that class exists, else ""),
  `defaultPodResourceRequirements` (CDI's defaults, overridden per field), `importProxy`,
  `preallocation`, `uploadProxyURL` (from the override), `imagePullSecrets`.
* `storage_profile_status(storage_class, spec)`: the StorageProfile `status` for one class:
  `claimPropertySets` (the spec's, else built-in defaults for known provisioners, ours
  included), `cloneStrategy`, `dataImportCronSourceFormat`, `snapshotClass`, `provisioner`,
  `storageClass`.
* Lookups on a CDIConfig status that the PVC and pod renderers share: the overhead of a class,
  of a PVC.

Pure functions over plain JSON dicts: no API calls, no clock (conditions with timestamps are the
reconciler's). Invalid input that CDI refuses raises `ConfigError` with CDI's message.

Not in the status, unlike the rest: `insecureRegistries`. CDI's CDIConfigStatus has no such
field (CDI reads `spec.insecureRegistries` directly) and our CRD schema prunes unknown status
fields, so a value put there would silently vanish; callers pass `spec.insecureRegistries`.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

from cdi.api import DEFAULT_FILESYSTEM_OVERHEAD, CloneStrategy, VolumeMode
from cdi.api import annotations as ann
from cdi.api.groups import LOCAL_PROVISIONER
from cdi.api.phases import AccessMode

Obj = dict[str, Any]

# CDI's validOverhead: 0, 1, or 0.x with at most three decimals.
_OVERHEAD = re.compile(r"^(0(?:\.\d{1,3})?|1)$")

#: `defaultPodResourceRequirements` when CDIConfig overrides nothing (CDI's defaults).
DEFAULT_POD_RESOURCE_REQUIREMENTS: Final[Mapping[str, Mapping[str, str]]] = {
    "limits": {"cpu": "750m", "memory": "600M"},
    "requests": {"cpu": "100m", "memory": "60M"},
}
# Only these two resources can be overridden, as in CDI.
_OVERRIDABLE_RESOURCES: Final = ("cpu", "memory")

DATA_IMPORT_CRON_SOURCE_FORMAT_PVC: Final = "pvc"


def _sets(*pairs: tuple[AccessMode, VolumeMode]) -> tuple[Obj, ...]:
    return tuple({"accessModes": [mode.value], "volumeMode": vm.value} for mode, vm in pairs)


_RWO, _ROX, _RWX = AccessMode.READ_WRITE_ONCE, AccessMode.READ_ONLY_MANY, AccessMode.READ_WRITE_MANY
_FS, _BLOCK = VolumeMode.FILESYSTEM, VolumeMode.BLOCK

#: Built-in claimPropertySets per provisioner, preferred first. Ours (the all-in-one server's
#: local volumes: a directory or a fixed-size file) does both volume modes, one node at a time.
#: The rest is the part of CDI's capabilities table that depends on the provisioner name alone
#: (entries CDI derives from class parameters are left out rather than guessed).
KNOWN_CLAIM_PROPERTY_SETS: Final[Mapping[str, tuple[Obj, ...]]] = {
    LOCAL_PROVISIONER: _sets((_RWO, _FS), (_RWO, _BLOCK)),
    "kubevirt.io.hostpath-provisioner": _sets((_RWO, _FS)),
    "kubevirt.io/hostpath-provisioner": _sets((_RWO, _FS)),
    "k8s.io/minikube-hostpath": _sets((_RWO, _FS)),
    "nfs.csi.k8s.io": _sets((_RWX, _FS)),
    "k8s-sigs.io/nfs-subdir-external-provisioner": _sets((_RWX, _FS)),
    "cephfs.csi.ceph.com": _sets((_RWX, _FS), (_RWO, _FS)),
    "rook-ceph.cephfs.csi.ceph.com": _sets((_RWX, _FS), (_RWO, _FS)),
    "kubernetes.io/aws-ebs": _sets((_RWO, _BLOCK)),
    "ebs.csi.aws.com": _sets((_RWO, _BLOCK)),
    "efs.csi.aws.com": _sets((_RWX, _FS), (_RWO, _FS)),
    "disk.csi.azure.com": _sets((_RWO, _BLOCK)),
    "file.csi.azure.com": _sets((_RWX, _FS)),
    "pd.csi.storage.gke.io": _sets((_RWO, _BLOCK)),
    "driver.longhorn.io": _sets((_RWO, _BLOCK)),
    "kubesan.gitlab.io": _sets((_RWX, _BLOCK), (_ROX, _BLOCK), (_RWO, _BLOCK), (_RWO, _FS)),
}

#: Advised clone strategies (CDI's table, same subset rule). Our local volumes are copied by the
#: host-assisted path, so "copy".
KNOWN_CLONE_STRATEGIES: Final[Mapping[str, CloneStrategy]] = {
    "rbd.csi.ceph.com": CloneStrategy.CSI_CLONE,
    "rook-ceph.rbd.csi.ceph.com": CloneStrategy.CSI_CLONE,
    "cephfs.csi.ceph.com": CloneStrategy.CSI_CLONE,
    "rook-ceph.cephfs.csi.ceph.com": CloneStrategy.CSI_CLONE,
    "topolvm.io": CloneStrategy.COPY,
    "kubesan.gitlab.io": CloneStrategy.CSI_CLONE,
    "pd.csi.storage.gke.io": CloneStrategy.SNAPSHOT,
}


class ConfigError(ValueError):
    """Configuration CDI refuses; the message is CDI's (and names the offending field)."""


def valid_overhead(value: object) -> bool:
    """CDI's filesystem overhead syntax (the CRD enforces the same pattern)."""
    return isinstance(value, str) and bool(_OVERHEAD.match(value))


def cdiconfig_status(
    spec: Mapping[str, Any],
    storage_classes: Iterable[Mapping[str, Any]],
    *,
    upload_proxy_url: str | None = None,
) -> Obj:
    """The CDIConfig `status` for `spec`, given the StorageClasses that exist now.
    `upload_proxy_url` is where this installation serves its upload proxy (CDI finds it from an
    Ingress or Route); the spec's `uploadProxyURLOverride` wins over it."""
    class_names = [str(sc.get("metadata", {}).get("name", "")) for sc in storage_classes]
    status: Obj = {
        "preallocation": bool(spec.get("preallocation")),
        "scratchSpaceStorageClass": _scratch_class(
            spec.get("scratchSpaceStorageClass"), class_names
        ),
        "defaultPodResourceRequirements": _pod_resources(spec.get("podResourceRequirements")),
        "filesystemOverhead": _filesystem_overhead(spec.get("filesystemOverhead"), class_names),
        "importProxy": _import_proxy(spec.get("importProxy")),
    }
    # CDI falls back to an Ingress or Route host; there is none to look at here, so only the
    # override counts (the all-in-one server's CLI knows its own upload proxy address).
    if override := spec.get("uploadProxyURLOverride") or upload_proxy_url:
        status["uploadProxyURL"] = str(override)
    if secrets := spec.get("imagePullSecrets"):
        status["imagePullSecrets"] = copy.deepcopy(list(secrets))
    return status


def _scratch_class(requested: object, class_names: list[str]) -> str:
    # Only an existing class: a missing one would leave every scratch claim Pending forever.
    # "" tells the importer to use the target's class (CDI no longer picks the default class).
    if isinstance(requested, str) and requested in class_names:
        return requested
    return ""


def _pod_resources(spec_value: object) -> Obj:
    result: Obj = {kind: dict(values) for kind, values in DEFAULT_POD_RESOURCE_REQUIREMENTS.items()}
    if isinstance(spec_value, Mapping):
        for kind in ("limits", "requests"):
            given = spec_value.get(kind)
            if not isinstance(given, Mapping):
                continue
            for resource in _OVERRIDABLE_RESOURCES:
                if resource in given:
                    result[kind][resource] = str(given[resource])
    return result


def _filesystem_overhead(spec_value: object, class_names: list[str]) -> Obj:
    spec_overhead: Mapping[str, Any] = spec_value if isinstance(spec_value, Mapping) else {}
    global_overhead = spec_overhead.get("global")
    # An invalid global value is ignored (the default stays), as CDI does.
    if not valid_overhead(global_overhead):
        global_overhead = DEFAULT_FILESYSTEM_OVERHEAD
    per_class_spec = spec_overhead.get("storageClass") or {}
    per_class: dict[str, str] = {}
    for name in class_names:
        if name in per_class_spec:
            value = per_class_spec[name]
            if not valid_overhead(value):
                # CDI fails the whole reconcile here rather than guess; so do we.
                raise ConfigError(
                    f"filesystemOverhead.storageClass[{name}] {value!r} is not valid: use a "
                    "fraction between 0 and 1 with at most three decimals, such as 0.06"
                )
            per_class[name] = str(value)
        else:
            per_class[name] = str(global_overhead)
    return {"global": str(global_overhead), "storageClass": per_class}


def _import_proxy(spec_value: object) -> Obj:
    if isinstance(spec_value, Mapping):
        return copy.deepcopy(dict(spec_value))
    # CDI writes empty strings (and would try OpenShift's cluster-wide Proxy, absent here).
    return {"HTTPProxy": "", "HTTPSProxy": "", "noProxy": "", "trustedCAProxy": ""}


def class_overhead(cdi_config_status: Mapping[str, Any], storage_class_name: str | None) -> str:
    """The filesystem overhead CDIConfig gives a class: its own value, else the global one.

    An explicit empty class name means "no class" (a static PV), overhead "0", as in CDI. When
    the config controller has not written the status yet, CDI's default global value is used
    rather than CDI's "0", so a claim is never sized without room for the filesystem.
    """
    if storage_class_name == "":
        return "0"
    overhead = cdi_config_status.get("filesystemOverhead")
    if not isinstance(overhead, Mapping):
        return DEFAULT_FILESYSTEM_OVERHEAD
    per_class = overhead.get("storageClass") or {}
    if storage_class_name is not None and storage_class_name in per_class:
        return str(per_class[storage_class_name])
    return str(overhead.get("global") or DEFAULT_FILESYSTEM_OVERHEAD)


def pvc_overhead(pvc: Mapping[str, Any], cdi_config_status: Mapping[str, Any]) -> str:
    """`FILESYSTEM_OVERHEAD` for a worker on this PVC: "0" for Block, else its class's value."""
    spec = pvc.get("spec") or {}
    if spec.get("volumeMode") == VolumeMode.BLOCK:
        return "0"
    return class_overhead(cdi_config_status, spec.get("storageClassName"))


def storage_profile_status(
    storage_class: Mapping[str, Any],
    spec: Mapping[str, Any] | None,
    *,
    snapshot_class: str | None = None,
) -> Obj:
    """The StorageProfile `status` for a StorageClass and the profile's `spec` (None: no spec).

    `snapshot_class` names a VolumeSnapshotClass for the class's driver, when the caller knows
    one: CDI then defaults to snapshot clones.
    """
    spec = spec or {}
    metadata = storage_class.get("metadata") or {}
    provisioner = str(storage_class.get("provisioner") or "")
    status: Obj = {
        "storageClass": str(metadata.get("name", "")),
        "provisioner": provisioner,
        "claimPropertySets": _claim_property_sets(spec.get("claimPropertySets"), provisioner),
        "cloneStrategy": _clone_strategy(
            spec.get("cloneStrategy"),
            metadata.get("annotations") or {},
            provisioner,
            snapshot_class,
        ),
        "dataImportCronSourceFormat": str(
            spec.get("dataImportCronSourceFormat") or DATA_IMPORT_CRON_SOURCE_FORMAT_PVC
        ),
    }
    if snapshot := spec.get("snapshotClass"):
        status["snapshotClass"] = str(snapshot)
    return status


def _claim_property_sets(spec_sets: object, provisioner: str) -> list[Obj]:
    if isinstance(spec_sets, list) and spec_sets:
        for item in spec_sets:
            if not item.get("accessModes") and item.get("volumeMode"):
                raise ConfigError(
                    f"must provide access mode for volume mode: {item.get('volumeMode')}"
                )
        return copy.deepcopy(spec_sets)
    # Unknown provisioner: no sets, an "incomplete" profile; DataVolumes must then name their
    # access modes themselves (rendering says so).
    return copy.deepcopy(list(KNOWN_CLAIM_PROPERTY_SETS.get(provisioner, ())))


def _clone_strategy(
    spec_strategy: object,
    class_annotations: Mapping[str, Any],
    provisioner: str,
    snapshot_class: str | None,
) -> str:
    if spec_strategy:
        return str(spec_strategy)
    try:
        # CDI maps an unknown annotation value to "", which the CRD enum then rejects on every
        # status write; falling through to the default instead keeps the profile usable.
        return CloneStrategy(str(class_annotations.get(ann.STORAGE_CLASS_CLONE_STRATEGY))).value
    except ValueError:
        pass
    strategy = CloneStrategy.SNAPSHOT if snapshot_class else CloneStrategy.COPY
    strategy = KNOWN_CLONE_STRATEGIES.get(provisioner, strategy)
    # A snapshot clone without a VolumeSnapshotClass cannot work.
    if strategy is CloneStrategy.SNAPSHOT and not snapshot_class:
        strategy = CloneStrategy.COPY
    return strategy.value
