"""The upload server's pod and Service names for a PVC: CDI's rule, as `cdi.controller.naming`
has it (a worker may not import the controller; `tests/uploadproxy/test_naming.py` checks that
the two copies agree).

`cdi-upload-<pvc>`, shortened past 253 characters with an FNV-1a hash (OpenShift's
`naming.GetName`); the Service takes the pod's name with dots made dashes, shortened past 63.
"""

from __future__ import annotations

from typing import Final

OBJECT_NAME_MAX: Final = 253
LABEL_NAME_MAX: Final = 63
UPLOAD_POD_PREFIX: Final = "cdi-upload"
_LABEL_SUFFIX: Final = "cdi"
_FNV32_OFFSET: Final = 0x811C9DC5
_FNV32_PRIME: Final = 0x01000193


def _name_hash(text: str) -> str:
    h = _FNV32_OFFSET
    for byte in text.encode():
        h = ((h ^ byte) * _FNV32_PRIME) & 0xFFFFFFFF
    return f"{h:08x}"


def _get_name(base: str, suffix: str, max_length: int) -> str:
    name = f"{base}-{suffix}"
    if len(name) <= max_length:
        return name
    base_length = max_length - 10 - len(suffix)
    if base_length < 0:
        prefix = base[: min(len(base), max(0, max_length - 9))]
        short = f"{prefix}-{_name_hash(name)}"
        return short[: min(max_length, len(short))]
    return f"{base[:base_length]}-{_name_hash(base)}-{suffix}"


def upload_pod_name(pvc_name: str) -> str:
    """`cdi-upload-<pvc>` (CDI's `createUploadResourceName`)."""
    return _get_name(UPLOAD_POD_PREFIX, pvc_name, OBJECT_NAME_MAX)


def service_name(pod_name: str) -> str:
    """The headless Service named after upload pod `pod_name` (a DNS-1035 label)."""
    base = pod_name.replace(".", "-")
    if len(base) <= LABEL_NAME_MAX:
        return base
    return _get_name(base, _LABEL_SUFFIX, LABEL_NAME_MAX)
