"""The PVC a DataVolume needs, and the admission checks a DataVolume must pass (§1.3, §1.4, §1.12).

Owns, as pure functions over plain JSON dicts:

* `render_pvc(dv, ...)`: the claim CDI's DataVolume controller creates: name and namespace of
  the DV; labels (the DV's, `app=containerized-data-importer`, and the filling-up alert switched
  off for Filesystem volumes: an imported disk image fills its volume by design); annotations
  (the DV's plus `storage.pod.restarts=0`, `storage.contentType`,
  `storage.preallocation.requested`, `createdForDataVolume` and the import inputs
  `storage.import.*` of http, s3 and blank sources); an ownerReference to the DV; and the spec:
  `spec.pvc` verbatim, or `spec.storage` completed as CDI does (class, access and volume modes
  from the StorageProfile, size inflated by the filesystem overhead).
* `render_scratch_pvc(pvc, ...)`: the `<pvc>-scratch` claim a worker converts through (§5.7).
* `validate_datavolume(dv)`: CDI's validating-webhook rules for the sources this project serves
  (http, s3, blank, pvc, upload), in CDI's words.

Errors: `RenderError` (a ValueError) with CDI's message and the event reason the reconciler
should use. Nothing here talks to the API: the reconciler passes the StorageClasses, the
StorageProfiles and the CDIConfig status it read.

Where we differ from CDI, on purpose: rendering always happens here (CDI can leave it to a PVC
mutating webhook, which we do not have); a DataVolume whose source we cannot import (gcs,
registry, imageio, vddk) is refused with a message instead of producing a claim nobody fills;
`spec.pvc` without a size is refused here too (CDI relies on its webhook for that).
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Mapping
from decimal import Decimal
from fractions import Fraction
from typing import Any, Final
from urllib.parse import urlsplit

from cdi.api import (
    MIB,
    ContentType,
    OverheadError,
    QuantityError,
    SourceType,
    VolumeMode,
    parse_overhead,
    parse_quantity,
    parse_size,
    required_size,
    round_up,
    usable_size,
)
from cdi.api import annotations as ann
from cdi.api.groups import DATA_VOLUME, PERSISTENT_VOLUME_CLAIM
from cdi.api.phases import VOLUME_MODE_FROM_STORAGE_PROFILE, AccessMode
from cdi.controller import naming
from cdi.controller.config import class_overhead, pvc_overhead

Obj = dict[str, Any]

# Event reasons (CDI's `ErrClaimNotValid`; the second one is ours).
REASON_CLAIM_NOT_VALID: Final = "ErrClaimNotValid"
REASON_UNSUPPORTED_SOURCE: Final = "ErrUnsupportedSource"

# CDI's messages.
MESSAGE_ARCHIVE_BLOCK: Final = "ContentType Archive cannot have block volumeMode"
MESSAGE_STORAGE_CLASS_NOT_FOUND: Final = (
    "PVC spec is missing accessMode and no storageClass to choose profile"
)
MESSAGE_NO_PVC_OR_STORAGE: Final = "datavolume one of {pvc, storage} field is required"
MESSAGE_SIZE_TOO_SMALL: Final = "PVC Spec is not valid - storage size should be at least 1MiB"
# Kubernetes' own message for a string that is not a quantity.
MESSAGE_NOT_A_QUANTITY: Final = (
    "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"
)

# The `storage` fields that carry over to a claim spec (CDI's copyStorageAsPvc).
_STORAGE_FIELDS: Final = (
    "accessModes",
    "selector",
    "resources",
    "volumeName",
    "storageClassName",
    "volumeMode",
    "dataSource",
    "dataSourceRef",
)
_IMPORT_SOURCES: Final = ("http", "s3", "blank")
_CLONE_SOURCES: Final = ("pvc", "snapshot")
_SERVED_SOURCES: Final = (*_IMPORT_SOURCES, *_CLONE_SOURCES, "upload")
_CHECKSUM_HEX_LENGTHS: Final = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}
_VALID_ACCESS_MODES: Final = tuple(mode.value for mode in AccessMode)
# Annotations CDI copies onto the scratch claim: other kubevirt.io tooling's, never CDI's own
# (those would make the scratch claim look like an import target).
_KUBEVIRT_ANNOTATION: Final = "kubevirt.io/"
_CDI_ANNOTATION: Final = "cdi.kubevirt.io"
_SELECTED_NODE: Final = "volume.kubernetes.io/selected-node"


class RenderError(ValueError):
    """A DataVolume that cannot be turned into a claim (yet). `str()` is CDI's message and
    `reason` the event reason to report it under; the DataVolume stays Pending until its spec,
    a StorageClass or a StorageProfile changes."""

    def __init__(self, message: str, *, reason: str = REASON_CLAIM_NOT_VALID) -> None:
        super().__init__(message)
        self.reason = reason


# --- small readers -------------------------------------------------------------------------------


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))


def content_type(dv: Mapping[str, Any]) -> ContentType:
    """The DataVolume's content type; empty or unknown is kubevirt, as CDI's GetContentType."""
    raw = (dv.get("spec") or {}).get("contentType")
    return ContentType.ARCHIVE if raw == ContentType.ARCHIVE else ContentType.KUBEVIRT


def source_kinds(dv: Mapping[str, Any]) -> list[str]:
    """The keys of `spec.source` that are set (a valid DataVolume has exactly one)."""
    source = (dv.get("spec") or {}).get("source") or {}
    return [kind for kind, value in source.items() if value is not None]


def find_storage_class(
    storage_classes: Iterable[Mapping[str, Any]], name: str
) -> Mapping[str, Any] | None:
    return next((sc for sc in storage_classes if _name(sc) == name), None)


def default_storage_class(
    storage_classes: Iterable[Mapping[str, Any]], content: ContentType
) -> Mapping[str, Any] | None:
    """The class a claim without one gets: for disk images the class annotated as the default
    for virtualization, else the Kubernetes default. Several defaults: the newest wins, then
    the first by name, as Kubernetes chooses."""
    classes = list(storage_classes)
    keys = [ann.DEFAULT_STORAGE_CLASS]
    if content is ContentType.KUBEVIRT:
        keys.insert(0, ann.DEFAULT_VIRT_STORAGE_CLASS)
    for key in keys:
        defaults = [
            sc
            for sc in classes
            if (sc.get("metadata") or {}).get("annotations", {}).get(key) == "true"
        ]
        if defaults:
            defaults.sort(key=_name)
            # RFC 3339 timestamps in one format order as strings; stable sort keeps name order.
            defaults.sort(
                key=lambda sc: str((sc.get("metadata") or {}).get("creationTimestamp") or ""),
                reverse=True,
            )
            return defaults[0]
    return None


def _profile_for(
    storage_profiles: Iterable[Mapping[str, Any]], class_name: str
) -> Mapping[str, Any] | None:
    return next((sp for sp in storage_profiles if _name(sp) == class_name), None)


def _bytes(quantity: object) -> int:
    """A quantity as bytes, rounded up as Kubernetes' `Quantity.Value()`; RenderError if bad."""
    try:
        return math.ceil(parse_quantity(str(quantity)))
    except QuantityError:
        raise RenderError(MESSAGE_NOT_A_QUANTITY) from None


def decimal_si(size: int) -> str:
    """A byte count as Kubernetes prints a DecimalSI quantity: 11381663335 -> "11381663335",
    1500000000 -> "1500M". CDI writes rendered sizes this way (never "10Gi")."""
    if size == 0:
        return "0"
    for suffix, exponent in (("E", 18), ("P", 15), ("T", 12), ("G", 9), ("M", 6), ("k", 3)):
        if size % 10**exponent == 0:
            return f"{size // 10**exponent}{suffix}"
    return str(size)


def _overhead(text: str) -> Fraction:
    try:
        return parse_overhead(text)
    except OverheadError as err:
        raise RenderError(f"CDIConfig status: {err}") from None


# --- import inputs -------------------------------------------------------------------------------


def import_annotations(source: Mapping[str, Any]) -> dict[str, str]:
    """The PVC annotations that carry a DataVolume source to the import controller (§2, §4.2).

    http: endpoint, source, secretName, certConfigMap, checksum, insecureSkipVerify, and one
    `extraHeaders.<i>` / `secretExtraHeaders.<i>` per entry, in order; s3: endpoint, source,
    secretName, certConfigMap; blank: source `none`; upload: the legacy `storage.upload.target`.
    """
    out: dict[str, str] = {}
    if (http := source.get("http")) is not None:
        out[ann.IMPORT_ENDPOINT] = str(http.get("url", ""))
        out[ann.IMPORT_SOURCE] = SourceType.HTTP.value
        if secret := http.get("secretRef"):
            out[ann.IMPORT_SECRET_NAME] = str(secret)
        if cm := http.get("certConfigMap"):
            out[ann.IMPORT_CERT_CONFIG_MAP] = str(cm)
        if checksum := http.get("checksum"):
            out[ann.IMPORT_CHECKSUM] = str(checksum)
        if http.get("insecureSkipVerify") is True:
            out[ann.IMPORT_INSECURE_SKIP_VERIFY] = "true"
        for i, header in enumerate(http.get("extraHeaders") or []):
            out[f"{ann.IMPORT_EXTRA_HEADERS_PREFIX}{i}"] = str(header)
        for i, secret_name in enumerate(http.get("secretExtraHeaders") or []):
            out[f"{ann.IMPORT_SECRET_EXTRA_HEADERS_PREFIX}{i}"] = str(secret_name)
    elif (s3 := source.get("s3")) is not None:
        out[ann.IMPORT_ENDPOINT] = str(s3.get("url", ""))
        out[ann.IMPORT_SOURCE] = SourceType.S3.value
        if secret := s3.get("secretRef"):
            out[ann.IMPORT_SECRET_NAME] = str(secret)
        if cm := s3.get("certConfigMap"):
            out[ann.IMPORT_CERT_CONFIG_MAP] = str(cm)
    elif source.get("blank") is not None:
        out[ann.IMPORT_SOURCE] = SourceType.NONE.value
    elif source.get("upload") is not None:
        out[ann.UPLOAD_TARGET] = ""
    return out


# --- the claim spec ------------------------------------------------------------------------------


def render_pvc_spec(
    dv: Mapping[str, Any],
    *,
    storage_classes: Iterable[Mapping[str, Any]],
    storage_profiles: Iterable[Mapping[str, Any]],
    cdi_config_status: Mapping[str, Any],
) -> Obj:
    """The claim `spec` for a DataVolume: `spec.pvc` verbatim, or `spec.storage` rendered."""
    spec = dv.get("spec") or {}
    if spec.get("pvc") is not None:
        pvc_spec: Obj = copy.deepcopy(dict(spec["pvc"]))
        if ((pvc_spec.get("resources") or {}).get("requests") or {}).get("storage") is None:
            # CDI's webhook refuses this; without a size the API server would refuse the claim.
            raise RenderError("PVC size is missing")
        return pvc_spec
    if spec.get("storage") is None:
        raise RenderError(MESSAGE_NO_PVC_OR_STORAGE)
    classes = list(storage_classes)
    profiles = list(storage_profiles)
    storage = spec["storage"]
    pvc_spec = {k: copy.deepcopy(storage[k]) for k in _STORAGE_FIELDS if storage.get(k) is not None}
    if pvc_spec.get("volumeMode") in (VOLUME_MODE_FROM_STORAGE_PROFILE, ""):
        del pvc_spec["volumeMode"]
    content = content_type(dv)
    _render_modes_and_class(pvc_spec, content, classes, profiles)
    source = spec.get("source") or {}
    is_clone = spec.get("sourceRef") is not None or any(
        source.get(kind) is not None for kind in _CLONE_SOURCES
    )
    _render_size(pvc_spec, is_clone, classes, profiles, cdi_config_status)
    return pvc_spec


def _render_modes_and_class(
    pvc_spec: Obj,
    content: ContentType,
    classes: list[Mapping[str, Any]],
    profiles: list[Mapping[str, Any]],
) -> None:
    """Class, access modes and volume mode, completed as CDI's DataVolume controller does."""
    if content is ContentType.ARCHIVE:
        # An archive is extracted into a filesystem; there is nothing to extract into on Block.
        if pvc_spec.get("volumeMode") == VolumeMode.BLOCK:
            raise RenderError(MESSAGE_ARCHIVE_BLOCK)
        pvc_spec["volumeMode"] = VolumeMode.FILESYSTEM.value
    requested = pvc_spec.get("storageClassName")
    sc = (
        default_storage_class(classes, content)
        if requested is None
        else find_storage_class(classes, str(requested))
    )
    if sc is None:
        # CDI would also look for an available PV to copy modes from; without a class, the
        # spec must already say how the volume is accessed.
        if not pvc_spec.get("accessModes"):
            raise RenderError(MESSAGE_STORAGE_CLASS_NOT_FOUND)
        return
    class_name = _name(sc)
    pvc_spec["storageClassName"] = class_name
    volume_mode = pvc_spec.get("volumeMode")
    access_modes = list(pvc_spec.get("accessModes") or [])
    if volume_mode and access_modes:
        return
    profile = _profile_for(profiles, class_name)
    if profile is None:
        raise RenderError(
            f'cannot get StorageProfile: storageprofiles.cdi.kubevirt.io "{class_name}" not found'
        )
    sets = list((profile.get("status") or {}).get("claimPropertySets") or [])
    if not volume_mode and not access_modes:
        # Neither given: the profile's first (preferred) set.
        if sets and sets[0].get("accessModes"):
            pvc_spec["accessModes"] = list(sets[0]["accessModes"])
            if sets[0].get("volumeMode"):
                pvc_spec["volumeMode"] = sets[0]["volumeMode"]
            return
        raise RenderError(f"no accessMode specified in StorageProfile {class_name}")
    if not access_modes:
        # Volume mode given: the access modes of the first set with that volume mode.
        for cps in sets:
            if cps.get("volumeMode") == volume_mode and cps.get("accessModes"):
                pvc_spec["accessModes"] = list(cps["accessModes"])
                return
        raise RenderError(f"no matching accessMode specified in StorageProfile {class_name}")
    # Access modes given: the volume mode of the first set sharing one of them, else leave it
    # to Kubernetes (Filesystem).
    for cps in sets:
        if any(mode in access_modes for mode in cps.get("accessModes") or []):
            if cps.get("volumeMode"):
                pvc_spec["volumeMode"] = cps["volumeMode"]
            return


def _render_size(
    pvc_spec: Obj,
    is_clone: bool,
    classes: list[Mapping[str, Any]],
    profiles: list[Mapping[str, Any]],
    cdi_config_status: Mapping[str, Any],
) -> None:
    """Size: at least 1 MiB; Filesystem inflated for the filesystem overhead; then raised to the
    StorageProfile's minimumSupportedPvcSize."""
    resources = pvc_spec.setdefault("resources", {})
    requests = resources.setdefault("requests", {})
    raw = requests.get("storage")
    if raw is None:
        if not is_clone:
            raise RenderError("PVC size is missing")
        # The clone controller fills it in from the source.
        requests["storage"] = "0"
        return
    size = _bytes(raw)
    if size <= 0:
        raise RenderError("PVC size can't be equal or less than zero")
    if size < MIB:
        # KubeVirt does not take disks smaller than 1 MiB.
        raise RenderError(MESSAGE_SIZE_TOO_SMALL)
    if pvc_spec.get("volumeMode", VolumeMode.FILESYSTEM) == VolumeMode.FILESYSTEM:
        overhead = _overhead(
            _class_overhead(classes, cdi_config_status, pvc_spec.get("storageClassName"))
        )
        size = required_size(size, overhead)
    rendered = decimal_si(size)
    if (class_name := pvc_spec.get("storageClassName")) is not None:
        profile = _profile_for(profiles, str(class_name))
        minimum = (
            ((profile or {}).get("metadata") or {})
            .get("annotations", {})
            .get(ann.MINIMUM_SUPPORTED_PVC_SIZE)
        )
        if minimum is not None:
            try:
                if parse_size(str(minimum)) > size:
                    rendered = str(minimum)
            except QuantityError:
                pass  # CDI ignores a minimum it cannot parse
    requests["storage"] = rendered


def _class_overhead(
    classes: list[Mapping[str, Any]], cdi_config_status: Mapping[str, Any], name: object
) -> str:
    """CDI's GetFilesystemOverheadForStorageClass: the named class if it exists, else the
    Kubernetes default class (never the virt default here), else the global value."""
    if name == "":
        return "0"
    sc = find_storage_class(classes, str(name)) if name is not None else None
    if sc is None:
        sc = default_storage_class(classes, ContentType.ARCHIVE)  # k8s default only
    return class_overhead(cdi_config_status, _name(sc) if sc is not None else None)


# --- the claim -----------------------------------------------------------------------------------


def _preallocation(dv_spec: Mapping[str, Any], cdi_config_status: Mapping[str, Any]) -> bool:
    # The DataVolume's choice, else CDIConfig's.
    if dv_spec.get("preallocation") is not None:
        return bool(dv_spec["preallocation"])
    return bool(cdi_config_status.get("preallocation", False))


def render_pvc(
    dv: Mapping[str, Any],
    *,
    storage_classes: list[dict[str, Any]],
    storage_profiles: list[dict[str, Any]],
    cdi_config_status: dict[str, Any],
) -> Obj:
    """The PersistentVolumeClaim CDI's DataVolume controller creates for `dv`."""
    kinds = source_kinds(dv)
    unsupported = [kind for kind in kinds if kind not in _SERVED_SOURCES]
    if unsupported:
        raise RenderError(
            f"DataVolume source {unsupported[0]} is not supported; use http, s3, blank, "
            "upload or pvc",
            reason=REASON_UNSUPPORTED_SOURCE,
        )
    metadata = dv.get("metadata") or {}
    dv_spec = dv.get("spec") or {}
    pvc_spec = render_pvc_spec(
        dv,
        storage_classes=storage_classes,
        storage_profiles=storage_profiles,
        cdi_config_status=cdi_config_status,
    )

    labels = {ann.LABEL_APP: ann.LABEL_APP_VALUE}
    if pvc_spec.get("volumeMode", VolumeMode.FILESYSTEM) == VolumeMode.FILESYSTEM:
        # An imported image fills its volume on purpose; the alert would only be noise.
        labels[ann.LABEL_FILLING_UP_ALERT] = ann.LABEL_FILLING_UP_ALERT_DISABLED
    labels.update({str(k): str(v) for k, v in (metadata.get("labels") or {}).items()})

    annotations = {str(k): str(v) for k, v in (metadata.get("annotations") or {}).items()}
    annotations[ann.POD_RESTARTS] = "0"
    annotations[ann.CONTENT_TYPE] = content_type(dv).value
    if priority := dv_spec.get("priorityClassName"):
        annotations[ann.POD_PRIORITY_CLASS_NAME] = str(priority)
    if account := dv_spec.get("serviceAccountName"):
        annotations[ann.POD_SERVICE_ACCOUNT_NAME] = str(account)
    annotations[ann.PREALLOCATION_REQUESTED] = str(
        _preallocation(dv_spec, cdi_config_status)
    ).lower()
    annotations[ann.CREATED_FOR_DATA_VOLUME] = str(metadata.get("uid", ""))
    annotations.update(import_annotations(dv_spec.get("source") or {}))

    return {
        "apiVersion": PERSISTENT_VOLUME_CLAIM.api_version,
        "kind": PERSISTENT_VOLUME_CLAIM.kind,
        "metadata": {
            "name": str(metadata.get("name", "")),
            "namespace": str(metadata.get("namespace", "")),
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [
                {
                    "apiVersion": DATA_VOLUME.api_version,
                    "kind": DATA_VOLUME.kind,
                    "name": str(metadata.get("name", "")),
                    "uid": str(metadata.get("uid", "")),
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": pvc_spec,
    }


def render_scratch_pvc(
    pvc: Mapping[str, Any], *, pod: Mapping[str, Any], cdi_config_status: Mapping[str, Any]
) -> Obj:
    """The scratch claim for a worker pod on `pvc` (§5.7), owned by that pod.

    Filesystem and ReadWriteOnce always (the worker writes a file there); class: CDIConfig's
    scratchSpaceStorageClass, else the target's. Size: what the target can hold, inflated by
    the scratch class's overhead: roundUp(required(usable(target request)), 1 MiB).
    """
    metadata = pvc.get("metadata") or {}
    spec = pvc.get("spec") or {}
    pvc_name = str(metadata.get("name", ""))
    scratch_class = str(cdi_config_status.get("scratchSpaceStorageClass") or "") or str(
        spec.get("storageClassName") or ""
    )
    annotations = {
        str(k): str(v)
        for k, v in (metadata.get("annotations") or {}).items()
        if _KUBEVIRT_ANNOTATION in k and _CDI_ANNOTATION not in k
    }
    pvc_annotations = metadata.get("annotations") or {}
    if ann.POPULATOR_KIND in pvc_annotations and pvc_annotations.get(_SELECTED_NODE):
        # A populator's PVC' is bound to a node already; the scratch claim must land there too.
        annotations[_SELECTED_NODE] = str(pvc_annotations[_SELECTED_NODE])
    target_request = parse_size(str(spec["resources"]["requests"]["storage"]))
    target_overhead = _overhead(pvc_overhead(pvc, cdi_config_status))
    scratch_overhead = _overhead(class_overhead(cdi_config_status, scratch_class or None))
    size = round_up(required_size(usable_size(target_request, target_overhead), scratch_overhead))
    resources = copy.deepcopy(dict(spec.get("resources") or {}))
    resources.setdefault("requests", {})["storage"] = decimal_si(size)
    pod_meta = pod.get("metadata") or {}
    scratch: Obj = {
        "apiVersion": PERSISTENT_VOLUME_CLAIM.api_version,
        "kind": PERSISTENT_VOLUME_CLAIM.kind,
        "metadata": {
            "name": naming.scratch_pvc_name(pvc_name),
            "namespace": str(metadata.get("namespace", "")),
            "labels": {
                ann.LABEL_APP: ann.LABEL_APP_VALUE,
                # Scratch data is a by-product; backing it up would double the backup size.
                ann.LABEL_EXCLUDE_FROM_BACKUP: "true",
            },
            "annotations": annotations,
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "name": str(pod_meta.get("name", "")),
                    "uid": str(pod_meta.get("uid", "")),
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": {"accessModes": [AccessMode.READ_WRITE_ONCE.value], "resources": resources},
    }
    if scratch_class:
        scratch["spec"]["storageClassName"] = scratch_class
    return scratch


# --- admission -----------------------------------------------------------------------------------

_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def _url_problem(url: str) -> str | None:
    """CDI's validateSourceURL: Go's url.ParseRequestURI, then the scheme check."""
    if url == "":
        return "source URL is empty"
    invalid = f"Invalid source URL: {url}"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        return invalid  # Go refuses control characters anywhere
    m = _URL_SCHEME.match(url)
    if m is None:
        # ParseRequestURI takes an absolute path without a scheme (which then fails the scheme
        # check); anything else is not a request URI at all.
        return _scheme_problem("", url) if url.startswith("/") else invalid
    try:
        parts = urlsplit(url)
        _ = parts.port  # a non-numeric port is a parse error in Go too
    except ValueError:
        return invalid
    if " " in parts.netloc:
        return invalid
    return _scheme_problem(m.group(1), url)


def _scheme_problem(scheme: str, url: str) -> str | None:
    if scheme not in ("http", "https", "gs"):
        return f"Invalid source URL scheme: {url}"
    return None


def _checksum_problem(checksum: str) -> str | None:
    algorithm, sep, digest = checksum.partition(":")
    length = _CHECKSUM_HEX_LENGTHS.get(algorithm)
    if (
        not sep
        or length is None
        or len(digest) != length
        or not re.fullmatch(r"[0-9a-fA-F]+", digest)
    ):
        return (
            f"Invalid checksum format: {checksum} (want md5, sha1, sha256 or sha512, a colon, "
            "and the hex digest)"
        )
    return None


def _size_problem(kind: str, resources: Mapping[str, Any], size_optional: bool) -> str | None:
    raw = ((resources or {}).get("requests") or {}).get("storage")
    if raw is None:
        return None if size_optional else f"{kind} size is missing"
    try:
        size = parse_quantity(str(raw))
    except QuantityError:
        return MESSAGE_NOT_A_QUANTITY
    if size <= 0:
        return f"{kind} size can't be equal or less than zero"
    if size < Decimal(MIB):
        # CDI's controller says this when it renders; saying it at admission saves a stuck DV.
        return MESSAGE_SIZE_TOO_SMALL
    return None


def _access_mode_problem(mode: object) -> str | None:
    if mode not in _VALID_ACCESS_MODES:
        supported = ", ".join(f'"{m}"' for m in sorted(_VALID_ACCESS_MODES))
        return f'Unsupported value: "{mode}": supported values: {supported}'
    return None


def validate_datavolume(dv: Mapping[str, Any]) -> list[str]:
    """CDI's admission rules for a DataVolume, in CDI's words; empty when it is acceptable.

    Like CDI's webhook it stops at the first problem, so the list holds one message (or, for
    an externally populated volume, every problem with its data source). Checks that need the
    API (the target PVC or the source PVC existing, a DataSource existing, spec immutability on
    update) are the caller's.
    """
    metadata = dv.get("metadata") or {}
    spec = dv.get("spec") or {}
    name = str(metadata.get("name", ""))
    if len(name) > naming.OBJECT_NAME_MAX:
        return [f"Name cannot be longer than {naming.OBJECT_NAME_MAX} characters"]

    pvc, storage = spec.get("pvc"), spec.get("storage")
    if pvc is None and storage is None:
        return ["Missing Data volume PVC"]
    if pvc is not None and storage is not None:
        return ["Duplicate storage definition, both target storage and target pvc defined"]
    target: Mapping[str, Any] = pvc if pvc is not None else storage or {}
    kind = "PVC" if pvc is not None else "Storage"

    source = spec.get("source")
    source_ref = spec.get("sourceRef")
    is_clone = source_ref is not None or any(
        (source or {}).get(k) is not None for k in _CLONE_SOURCES
    )
    # Only the storage API may leave the size out, and only for a clone (CDI sizes it from the
    # source).
    if problem := _size_problem(
        kind, target.get("resources") or {}, storage is not None and is_clone
    ):
        return [problem]
    class_name = target.get("storageClassName")
    if class_name and len(str(class_name)) > naming.OBJECT_NAME_MAX:
        return [f"Name cannot be longer than {naming.OBJECT_NAME_MAX} characters"]

    modes = list(target.get("accessModes") or [])
    if pvc is not None:
        if not modes:
            return ["Required value: at least 1 access mode is required"]
        if len(modes) > 1:
            return ["PVC multiple accessModes"]
    for mode in modes:
        if problem := _access_mode_problem(mode):
            return [problem]

    data_source, data_source_ref = target.get("dataSource"), target.get("dataSourceRef")
    if data_source is not None or data_source_ref is not None:
        return _external_population_problems(spec, data_source, data_source_ref)

    if (source is None) == (source_ref is None):
        return ["Data volume should have either Source or SourceRef, or be externally populated"]
    if source_ref is not None:
        return _source_ref_problems(source_ref)

    assert source is not None  # the either/or check above
    kinds = [k for k, v in source.items() if v is not None]
    if not kinds:
        return ["Missing Data volume source"]
    if len(kinds) > 1:
        return ["Multiple Data volume sources"]
    content = spec.get("contentType")
    if content not in (None, "", ContentType.KUBEVIRT, ContentType.ARCHIVE):
        return ["ContentType not one of: kubevirt, archive"]

    if (http := source.get("http")) is not None:
        if problem := _url_problem(str(http.get("url") or "")):
            return [f"spec.source {problem}"]
        if (checksum := http.get("checksum")) and (problem := _checksum_problem(str(checksum))):
            return [problem]
        for header in http.get("extraHeaders") or []:
            # Ours: the importer needs "Name: value"; catching it here beats a crash-looping pod.
            header_name, sep, _ = str(header).partition(":")
            if not sep or not header_name.strip() or " " in header_name.strip():
                return [f"Invalid extra header: {header!r} is not 'Name: value'"]
    if (s3 := source.get("s3")) is not None and (problem := _url_problem(str(s3.get("url") or ""))):
        return [f"spec.source {problem}"]
    if source.get("blank") is not None and content == ContentType.ARCHIVE:
        return ["SourceType cannot be blank and the contentType be archive"]
    if (pvc_source := source.get("pvc")) is not None and (
        not pvc_source.get("namespace") or not pvc_source.get("name")
    ):
        return ["spec.source.PVC source PVC is not valid"]
    return []


def _source_ref_problems(source_ref: Mapping[str, Any]) -> list[str]:
    ref_kind = source_ref.get("kind") or ""
    if not ref_kind:
        return ["Missing sourceRef kind"]
    if ref_kind != "DataSource":
        return [f"Unsupported sourceRef kind {ref_kind}, currently only DataSource is supported"]
    if not source_ref.get("name"):
        return ["Missing sourceRef name"]
    return []


def _external_population_problems(
    spec: Mapping[str, Any], data_source: Any, data_source_ref: Any
) -> list[str]:
    problems = []
    if spec.get("source") is not None or spec.get("sourceRef") is not None:
        problems.append("External population is incompatible with Source and SourceRef")
    if data_source is not None and data_source_ref is not None and data_source != data_source_ref:
        problems.append("DataSourceRef and DataSource must match")
    for label, ref in (("DataSource", data_source), ("DataSourceRef", data_source_ref)):
        if ref is None:
            continue
        if label == "DataSourceRef" and ref.get("namespace"):
            problems.append("Invalid value: DataSourceRef namespace not supported")
        if not ref.get("name"):
            problems.append(f"Required value: {label} name")
        if not ref.get("kind"):
            problems.append(f"Required value: {label} kind")
        if not ref.get("apiGroup") and ref.get("kind") != "PersistentVolumeClaim":
            problems.append(
                f"Required value: {label} apiGroup when kind is not 'PersistentVolumeClaim'"
            )
    return problems
