"""API groups, versions, kinds and plurals, spelled as CDI and Kubernetes spell them.

Owns only names. Every process (embedded API server, controller, workers, CLI) takes its group and
kind strings from here so that a typo cannot split the wire contract in two.
"""

from __future__ import annotations

from dataclasses import dataclass

CDI_GROUP = "cdi.kubevirt.io"
CDI_VERSION = "v1beta1"
CDI_API_VERSION = f"{CDI_GROUP}/{CDI_VERSION}"
CDI_LEGACY_VERSION = "v1alpha1"

UPLOAD_GROUP = "upload.cdi.kubevirt.io"
UPLOAD_VERSION = "v1beta1"
UPLOAD_API_VERSION = f"{UPLOAD_GROUP}/{UPLOAD_VERSION}"

KUBEVIRT_GROUP = "kubevirt.io"
KUBEVIRT_VERSION = "v1"
KUBEVIRT_API_VERSION = f"{KUBEVIRT_GROUP}/{KUBEVIRT_VERSION}"

SNAPSHOT_GROUP = "snapshot.storage.k8s.io"
SNAPSHOT_VERSION = "v1"
SNAPSHOT_API_VERSION = f"{SNAPSHOT_GROUP}/{SNAPSHOT_VERSION}"

CORE_GROUP = ""
CORE_VERSION = "v1"
STORAGE_GROUP = "storage.k8s.io"
RBAC_GROUP = "rbac.authorization.k8s.io"
APIEXTENSIONS_GROUP = "apiextensions.k8s.io"
AUTHORIZATION_GROUP = "authorization.k8s.io"


@dataclass(frozen=True, slots=True)
class Resource:
    """One served resource: where it lives on the wire and how clients abbreviate it."""

    group: str
    version: str
    kind: str
    plural: str
    namespaced: bool
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def singular(self) -> str:
        return self.kind.lower()


DATA_VOLUME = Resource(
    CDI_GROUP, CDI_VERSION, "DataVolume", "datavolumes", True, ("dv", "dvs"), ("all",)
)
CDI = Resource(CDI_GROUP, CDI_VERSION, "CDI", "cdis", False, ("cdi", "cdis"))
CDI_CONFIG = Resource(CDI_GROUP, CDI_VERSION, "CDIConfig", "cdiconfigs", False)
STORAGE_PROFILE = Resource(CDI_GROUP, CDI_VERSION, "StorageProfile", "storageprofiles", False)
DATA_SOURCE = Resource(
    CDI_GROUP, CDI_VERSION, "DataSource", "datasources", True, ("das",), ("all",)
)
DATA_IMPORT_CRON = Resource(
    CDI_GROUP, CDI_VERSION, "DataImportCron", "dataimportcrons", True, ("dic", "dics"), ("all",)
)
OBJECT_TRANSFER = Resource(
    CDI_GROUP, CDI_VERSION, "ObjectTransfer", "objecttransfers", False, ("ot", "ots")
)
VOLUME_IMPORT_SOURCE = Resource(
    CDI_GROUP, CDI_VERSION, "VolumeImportSource", "volumeimportsources", True
)
VOLUME_UPLOAD_SOURCE = Resource(
    CDI_GROUP, CDI_VERSION, "VolumeUploadSource", "volumeuploadsources", True
)
VOLUME_CLONE_SOURCE = Resource(
    CDI_GROUP, CDI_VERSION, "VolumeCloneSource", "volumeclonesources", True
)
UPLOAD_TOKEN_REQUEST = Resource(
    UPLOAD_GROUP, UPLOAD_VERSION, "UploadTokenRequest", "uploadtokenrequests", True, ("utr", "utrs")
)

VIRTUAL_MACHINE = Resource(
    KUBEVIRT_GROUP,
    KUBEVIRT_VERSION,
    "VirtualMachine",
    "virtualmachines",
    True,
    ("vm", "vms"),
    ("all",),
)
VIRTUAL_MACHINE_INSTANCE = Resource(
    KUBEVIRT_GROUP,
    KUBEVIRT_VERSION,
    "VirtualMachineInstance",
    "virtualmachineinstances",
    True,
    ("vmi", "vmis"),
    ("all",),
)

VOLUME_SNAPSHOT = Resource(
    SNAPSHOT_GROUP, SNAPSHOT_VERSION, "VolumeSnapshot", "volumesnapshots", True, ("vs",)
)
VOLUME_SNAPSHOT_CLASS = Resource(
    SNAPSHOT_GROUP,
    SNAPSHOT_VERSION,
    "VolumeSnapshotClass",
    "volumesnapshotclasses",
    False,
    ("vsclass", "vsclasses"),
)
VOLUME_SNAPSHOT_CONTENT = Resource(
    SNAPSHOT_GROUP,
    SNAPSHOT_VERSION,
    "VolumeSnapshotContent",
    "volumesnapshotcontents",
    False,
    ("vsc", "vscs"),
)

NAMESPACE = Resource(CORE_GROUP, CORE_VERSION, "Namespace", "namespaces", False, ("ns",))
PERSISTENT_VOLUME_CLAIM = Resource(
    CORE_GROUP, CORE_VERSION, "PersistentVolumeClaim", "persistentvolumeclaims", True, ("pvc",)
)
PERSISTENT_VOLUME = Resource(
    CORE_GROUP, CORE_VERSION, "PersistentVolume", "persistentvolumes", False, ("pv",)
)
POD = Resource(CORE_GROUP, CORE_VERSION, "Pod", "pods", True, ("po",), ("all",))
SERVICE = Resource(CORE_GROUP, CORE_VERSION, "Service", "services", True, ("svc",), ("all",))
SECRET = Resource(CORE_GROUP, CORE_VERSION, "Secret", "secrets", True)
CONFIG_MAP = Resource(CORE_GROUP, CORE_VERSION, "ConfigMap", "configmaps", True, ("cm",))
EVENT = Resource(CORE_GROUP, CORE_VERSION, "Event", "events", True, ("ev",))
STORAGE_CLASS = Resource(STORAGE_GROUP, "v1", "StorageClass", "storageclasses", False, ("sc",))

CDI_RESOURCES: tuple[Resource, ...] = (
    DATA_VOLUME,
    CDI,
    CDI_CONFIG,
    STORAGE_PROFILE,
    DATA_SOURCE,
    DATA_IMPORT_CRON,
    OBJECT_TRANSFER,
    VOLUME_IMPORT_SOURCE,
    VOLUME_UPLOAD_SOURCE,
    VOLUME_CLONE_SOURCE,
)

# The singleton CDIConfig object is always called this.
CDI_CONFIG_NAME = "config"

# `StorageClass.provisioner` of the all-in-one server's local volumes (cdi.provisioner); the
# controller gives its StorageProfiles built-in defaults, so it must spell it the same way.
LOCAL_PROVISIONER = "cdi.kubevirt.io/local"
