"""CDI's names for the objects it creates, including how over-long names are shortened (§4.6).

Owns name derivation only: `importer-<pvc>`, `<pvc>-scratch`, `cdi-upload-<pvc>`,
`import-proxy-cm-<pvc>`, `prime-<uid>`, `<uid>-source-pod`, and the shortening rule CDI borrows
from OpenShift's `naming.GetName`: `base-suffix` when it fits, else the base is cut and an
8-hex-digit FNV-1a (32-bit) hash is put before the suffix. The limits are 253 characters for
object names (DNS-1123 subdomain) and 63 for labels and Service names (DNS-1035 label).

The results must equal CDI's byte for byte: a controller restarted over objects CDI made (or the
other way round) finds its pods and claims by these names. Pure functions; called by the
reconcilers and by `cdi.controller.podspecs`/`rendering`.

Kubernetes names are ASCII, so Python string lengths and slices equal Go's byte lengths here.
"""

from __future__ import annotations

from typing import Final

#: DNS-1123 subdomain: names of pods, PVCs, secrets, config maps.
OBJECT_NAME_MAX: Final = 253
#: DNS-1035 label: label values and Service names.
LABEL_NAME_MAX: Final = 63

IMPORTER_POD_PREFIX: Final = "importer"
SCRATCH_SUFFIX: Final = "scratch"
UPLOAD_POD_PREFIX: Final = "cdi-upload"
IMPORT_PROXY_CONFIG_MAP_PREFIX: Final = "import-proxy-cm"
CLONE_SOURCE_POD_SUFFIX: Final = "-source-pod"
PRIME_PREFIX: Final = "prime-"
# The suffix CDI gives a label shortened from a resource name (see `label_name`).
_LABEL_SUFFIX: Final = "cdi"

_FNV32_OFFSET: Final = 0x811C9DC5
_FNV32_PRIME: Final = 0x01000193


def fnv1a_32(data: bytes) -> int:
    """32-bit FNV-1a, as Go's `hash/fnv.New32a`."""
    h = _FNV32_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV32_PRIME) & 0xFFFFFFFF
    return h


def name_hash(text: str) -> str:
    """The 8 lower-case hex digits CDI inserts into a shortened name."""
    return f"{fnv1a_32(text.encode()):08x}"


def get_name(base: str, suffix: str, max_length: int) -> str:
    """`base-suffix`, shortened to `max_length` as OpenShift's `naming.GetName` does.

    * fits: `base-suffix`;
    * suffix leaves room: `base[:max-10-len(suffix)]-<hash(base)>-suffix` (exactly `max` long);
    * suffix too long to keep: `base[:max-9]-<hash(base-suffix)>`, cut to `max`. The hash covers
      the suffix, so two long suffixes on one base still give different names.
    """
    if max_length <= 0:
        return ""
    name = f"{base}-{suffix}"
    if len(name) <= max_length:
        return name
    base_length = max_length - 10 - len(suffix)  # 10 = the two dashes and the hash
    if base_length < 0:
        prefix = base[: min(len(base), max(0, max_length - 9))]
        short = f"{prefix}-{name_hash(name)}"
        return short[: min(max_length, len(short))]
    return f"{base[:base_length]}-{name_hash(base)}-{suffix}"


def resource_name(base: str, suffix: str) -> str:
    """An object name (≤ 253): CDI's `naming.GetResourceName`."""
    return get_name(base, suffix, OBJECT_NAME_MAX)


def label_name(resource: str) -> str:
    """A label value or Service name (≤ 63) made from an object name.

    Dots become dashes (a Service name cannot hold them); a name still too long is shortened
    with the suffix `cdi`, as CDI's `GetLabelNameFromResourceName` does.
    """
    base = resource.replace(".", "-")
    if len(base) <= LABEL_NAME_MAX:
        return base
    return get_name(base, _LABEL_SUFFIX, LABEL_NAME_MAX)


def service_name(resource: str) -> str:
    """A Service name for an object name: the label rule (Service names are DNS-1035 labels)."""
    return label_name(resource)


def importer_pod_name(pvc_name: str, checkpoint: str | None = None) -> str:
    """`importer-<pvc>` (or `importer-<pvc>-checkpoint-<id>` for one stage of a warm import).

    When it does not fit, `get_name` drops the PVC name entirely (`importer-<hash>`): the suffix
    is the PVC name, so there is no room left to keep any of it.
    """
    target = f"{pvc_name}-checkpoint-{checkpoint}" if checkpoint else pvc_name
    return resource_name(IMPORTER_POD_PREFIX, target)


def scratch_pvc_name(pvc_name: str) -> str:
    """`<pvc>-scratch`: the temporary claim a worker converts through."""
    return resource_name(pvc_name, SCRATCH_SUFFIX)


def upload_pod_name(pvc_name: str) -> str:
    """`cdi-upload-<pvc>`: the upload server pod (and its TLS secret)."""
    return resource_name(UPLOAD_POD_PREFIX, pvc_name)


def upload_service_name(pvc_name: str) -> str:
    """The upload server's Service: the pod name made a valid Service name."""
    return service_name(upload_pod_name(pvc_name))


def import_proxy_config_map_name(pvc_name: str) -> str:
    """`import-proxy-cm-<pvc>`: the per-import copy of the import proxy's CA bundle."""
    return resource_name(IMPORT_PROXY_CONFIG_MAP_PREFIX, pvc_name)


def clone_source_pod_name(target_pvc_uid: str) -> str:
    """`<target uid>-source-pod`: the host-assisted clone source pod."""
    return target_pvc_uid + CLONE_SOURCE_POD_SUFFIX


def prime_pvc_name(target_pvc_uid: str) -> str:
    """`prime-<target uid>`: the claim a populator fills before rebinding (PVC')."""
    return PRIME_PREFIX + target_pvc_uid
