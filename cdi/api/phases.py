"""Phases, condition types and reasons, and the small enums of the wire contract (reference §3).

StrEnums in CDI's spelling, so a value compares equal to the string found on the wire.
"""

from __future__ import annotations

from enum import StrEnum


class DataVolumePhase(StrEnum):
    """`DataVolume.status.phase`: the complete enum of CDI v1beta1."""

    UNSET = ""
    PENDING = "Pending"
    PVC_BOUND = "PVCBound"
    IMPORT_SCHEDULED = "ImportScheduled"
    IMPORT_IN_PROGRESS = "ImportInProgress"
    CLONE_SCHEDULED = "CloneScheduled"
    CLONE_IN_PROGRESS = "CloneInProgress"
    SNAPSHOT_FOR_SMART_CLONE_IN_PROGRESS = "SnapshotForSmartCloneInProgress"
    CLONE_FROM_SNAPSHOT_SOURCE_IN_PROGRESS = "CloneFromSnapshotSourceInProgress"
    SMART_CLONE_PVC_IN_PROGRESS = "SmartClonePVCInProgress"
    CSI_CLONE_IN_PROGRESS = "CSICloneInProgress"
    EXPANSION_IN_PROGRESS = "ExpansionInProgress"
    NAMESPACE_TRANSFER_IN_PROGRESS = "NamespaceTransferInProgress"
    UPLOAD_SCHEDULED = "UploadScheduled"
    UPLOAD_READY = "UploadReady"
    WAIT_FOR_FIRST_CONSUMER = "WaitForFirstConsumer"
    PENDING_POPULATION = "PendingPopulation"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    UNKNOWN = "Unknown"
    PAUSED = "Paused"
    PREP_CLAIM_IN_PROGRESS = "PrepClaimInProgress"
    REBIND_IN_PROGRESS = "RebindInProgress"


class PodPhase(StrEnum):
    """Kubernetes pod phases, mirrored on the PVC in `storage.pod.phase`."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    UNKNOWN = "Unknown"


class PVCPhase(StrEnum):
    PENDING = "Pending"
    BOUND = "Bound"
    LOST = "Lost"


class ConditionType(StrEnum):
    BOUND = "Bound"
    READY = "Ready"
    RUNNING = "Running"


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class ConditionReason(StrEnum):
    """Reasons CDI puts on DataVolume conditions."""

    BOUND = "Bound"
    PENDING = "Pending"
    CLAIM_LOST = "ClaimLost"
    NOT_FOUND = "NotFound"
    TRANSFER_RUNNING = "TransferRunning"
    POD_RUNNING = "Pod is running"
    COMPLETED = "Completed"
    ERROR = "Error"
    OOM_KILLED = "OOMKilled"
    IMAGE_PULL_FAILED = "ImagePullFailed"
    SCRATCH_SPACE_REQUIRED = "Scratch space required"
    UNSCHEDULABLE = "Unschedulable"
    CHECKSUM_ERROR = "ChecksumError"
    CREATING_SCRATCH_SPACE = "CreatingScratchSpace"


class ImporterPhase(StrEnum):
    """The importer's processing state machine (reference §5.3)."""

    INFO = "Info"
    TRANSFER_SCRATCH = "TransferScratch"
    TRANSFER_DATA_DIR = "TransferDataDir"
    TRANSFER_DATA_FILE = "TransferDataFile"
    VALIDATE_PRE_SCRATCH = "ValidatePreScratch"
    VALIDATE_PAUSE = "ValidatePause"
    CONVERT = "Convert"
    RESIZE = "Resize"
    MERGE_DELTA = "MergeDelta"
    PAUSE = "Pause"
    COMPLETE = "Complete"
    ERROR = "Error"


class ContentType(StrEnum):
    KUBEVIRT = "kubevirt"
    ARCHIVE = "archive"


class SourceType(StrEnum):
    """`IMPORTER_SOURCE` and the `storage.import.source` annotation."""

    HTTP = "http"
    S3 = "s3"
    GCS = "gcs"
    REGISTRY = "registry"
    IMAGEIO = "imageio"
    VDDK = "vddk"
    NONE = "none"
    GLANCE = "glance"


class VolumeMode(StrEnum):
    FILESYSTEM = "Filesystem"
    BLOCK = "Block"


# `storage.volumeMode` may name this instead of a mode: "whatever the StorageProfile prefers".
# Not a VolumeMode member because it never appears on a PVC.
VOLUME_MODE_FROM_STORAGE_PROFILE = "FromStorageProfile"


class AccessMode(StrEnum):
    READ_WRITE_ONCE = "ReadWriteOnce"
    READ_ONLY_MANY = "ReadOnlyMany"
    READ_WRITE_MANY = "ReadWriteMany"
    READ_WRITE_ONCE_POD = "ReadWriteOncePod"


class CloneStrategy(StrEnum):
    COPY = "copy"
    SNAPSHOT = "snapshot"
    CSI_CLONE = "csi-clone"


class CloneContentType(StrEnum):
    """`x-cdi-content-type` header values on clone streams."""

    FILESYSTEM = "filesystem-clone"
    BLOCK_DEVICE = "blockdevice-clone"
