"""The pure-Python, streaming disk image format inspector.

It recognises qcow2, vmdk, vdi, vhd ("vpc"), vhdx, iso and raw, plus the containers gzip, xz,
zstd, bzip2 and tar, and refuses, with named problems, anything that would make qemu-img read
outside the image (backing files, external data files, VMDK extents, parent disks), unknown
features, ambiguous (polyglot) images and absurd sizes. One module per format; `registry` runs
them all over one stream. Callers use `inspect_file`, `inspect_stream` or `StreamInspector`.
"""

from cdi.image.formats.base import (
    MAX_REGION_BYTES,
    POINTER_LIMIT,
    CaptureRegion,
    EndRegion,
    FormatInspector,
    SafetyCheck,
)
from cdi.image.formats.registry import (
    COMPRESSION_FORMATS,
    DEFAULT_MAX_VIRTUAL_SIZE,
    FORMATS,
    WRAPPER_FORMATS,
    InspectionResult,
    StreamInspector,
    inspect_file,
    inspect_stream,
)

__all__ = [
    "COMPRESSION_FORMATS",
    "DEFAULT_MAX_VIRTUAL_SIZE",
    "FORMATS",
    "MAX_REGION_BYTES",
    "POINTER_LIMIT",
    "WRAPPER_FORMATS",
    "CaptureRegion",
    "EndRegion",
    "FormatInspector",
    "InspectionResult",
    "SafetyCheck",
    "StreamInspector",
    "inspect_file",
    "inspect_stream",
]
