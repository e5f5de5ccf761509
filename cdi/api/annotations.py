"""Every annotation and label key the project reads or writes, in CDI's spelling (reference §4).

Owns key strings only. Keys under `cdi.kubevirt.io/` are built with `_cdi()` so the prefix is
written once; the few keys CDI spells oddly (`cdi.Kubervirt.io/virtualSize`, `cloneUniqeId`) are
kept as CDI spells them because controllers on both sides must agree byte for byte.
"""

from __future__ import annotations

from typing import Final

CDI_PREFIX: Final = "cdi.kubevirt.io/"


def _cdi(suffix: str) -> str:
    return CDI_PREFIX + suffix


# --- pod / status bookkeeping on the target PVC (or PVC') -------------------------------------
POD_PHASE: Final = _cdi("storage.pod.phase")
POD_READY: Final = _cdi("storage.pod.ready")
POD_RESTARTS: Final = _cdi("storage.pod.restarts")
POD_SCHEDULABLE: Final = _cdi("storage.pod.schedulable")
POD_RETAIN_AFTER_COMPLETION: Final = _cdi("storage.pod.retainAfterCompletion")
POD_PRIORITY_CLASS_NAME: Final = _cdi("storage.pod.priorityclassname")
POD_SERVICE_ACCOUNT_NAME: Final = _cdi("storage.pod.serviceAccountName")
IMPORT_POD_NAME: Final = _cdi("storage.import.importPodName")
UPLOAD_POD_NAME: Final = _cdi("storage.uploadPodName")
SOURCE_CLONE_POD_NAME: Final = _cdi("storage.sourceClonePodName")

CONDITION_RUNNING: Final = _cdi("storage.condition.running")
CONDITION_RUNNING_REASON: Final = _cdi("storage.condition.running.reason")
CONDITION_RUNNING_MESSAGE: Final = _cdi("storage.condition.running.message")
CONDITION_SOURCE_RUNNING: Final = _cdi("storage.condition.source.running")
CONDITION_SOURCE_RUNNING_REASON: Final = _cdi("storage.condition.source.running.reason")
CONDITION_SOURCE_RUNNING_MESSAGE: Final = _cdi("storage.condition.source.running.message")
CONDITION_BOUND: Final = _cdi("storage.condition.bound")
CONDITION_BOUND_REASON: Final = _cdi("storage.condition.bound.reason")
CONDITION_BOUND_MESSAGE: Final = _cdi("storage.condition.bound.message")

REQUIRES_SCRATCH: Final = _cdi("storage.import.requiresScratch")
REQUIRES_DIRECT_IO: Final = _cdi("storage.import.requiresDirectIo")
FATAL_ERROR: Final = _cdi("storage.import.fatalError")
PREALLOCATION_REQUESTED: Final = _cdi("storage.preallocation.requested")
PREALLOCATION_APPLIED: Final = _cdi("storage.preallocation")
POPULATOR_PROGRESS: Final = _cdi("storage.populator.progress")
POPULATOR_KIND: Final = _cdi("storage.populator.kind")
PVC_PRIME: Final = _cdi("storage.populator.pvcPrime")
USE_POPULATOR: Final = _cdi("storage.usePopulator")
CREATED_BY_CONTROLLER: Final = _cdi("storage.createdByController")
CREATED_BY_UPLOAD_CONTROLLER: Final = _cdi("storage.createdByUploadController")
POPULATED_FOR: Final = _cdi("storage.populatedFor")
PRE_POPULATED: Final = _cdi("storage.prePopulated")
CHECK_STATIC_VOLUME: Final = _cdi("storage.checkStaticVolume")
PERSISTENT_VOLUME_LIST: Final = _cdi("storage.persistentVolumeList")
BIND_IMMEDIATE_REQUESTED: Final = _cdi("storage.bind.immediate.requested")
CONTENT_TYPE: Final = _cdi("storage.contentType")
DELETE_AFTER_COMPLETION: Final = _cdi("storage.deleteAfterCompletion")
ALLOW_CLAIM_ADOPTION: Final = _cdi("allowClaimAdoption")
EXTERNAL_POPULATION: Final = _cdi("externalPopulation")
CREATED_FOR_DATA_VOLUME: Final = _cdi("createdForDataVolume")
OWNER_UID: Final = _cdi("ownerUID")
OWNED_BY_DATA_VOLUME: Final = _cdi("ownedByDataVolume")
OWNER_REF: Final = _cdi("storage.ownerRef")
EVENTS_SOURCE_KIND: Final = _cdi("events.source.kind")
EVENTS_SOURCE: Final = _cdi("events.source")

# multi-stage (warm) import state; read into the importer's checkpoint variables
CHECKPOINT_PREVIOUS: Final = _cdi("storage.checkpoint.previous")
CHECKPOINT_CURRENT: Final = _cdi("storage.checkpoint.current")
CHECKPOINT_FINAL: Final = _cdi("storage.checkpoint.final")

# --- import inputs (storage.import.*) -----------------------------------------------------------
IMPORT_SOURCE: Final = _cdi("storage.import.source")
IMPORT_ENDPOINT: Final = _cdi("storage.import.endpoint")
IMPORT_SECRET_NAME: Final = _cdi("storage.import.secretName")
IMPORT_CERT_CONFIG_MAP: Final = _cdi("storage.import.certConfigMap")
IMPORT_INSECURE_SKIP_VERIFY: Final = _cdi("storage.import.insecureSkipVerify")
IMPORT_CHECKSUM: Final = _cdi("storage.import.checksum")
IMPORT_EXTRA_HEADERS_PREFIX: Final = _cdi("storage.import.extraHeaders.")
IMPORT_SECRET_EXTRA_HEADERS_PREFIX: Final = _cdi("storage.import.secretExtraHeaders.")
IMPORT_REGISTRY_IMPORT_METHOD: Final = _cdi("storage.import.registryImportMethod")
IMPORT_REGISTRY_IMAGE_STREAM: Final = _cdi("storage.import.registryImageStream")
IMPORT_REGISTRY_IMAGE_ARCHITECTURE: Final = _cdi("storage.import.registryImageArchitecture")
IMPORT_DISK_ID: Final = _cdi("storage.import.diskId")
IMPORT_UUID: Final = _cdi("storage.import.uuid")
IMPORT_BACKING_FILE: Final = _cdi("storage.import.backingFile")
IMPORT_VDDK_THUMBPRINT: Final = _cdi("storage.import.vddk.thumbprint")
IMPORT_SOURCE_DESIRED_DIGEST: Final = _cdi("storage.import.sourceDesiredDigest")

# --- upload / clone -------------------------------------------------------------------------------
UPLOAD_TARGET: Final = _cdi("storage.upload.target")
UPLOAD_CLIENT_NAME: Final = _cdi("uploadClientName")
CLONE_REQUEST: Final = "k8s.io/CloneRequest"
CLONE_OF: Final = "k8s.io/CloneOf"
CLONE_TOKEN: Final = _cdi("storage.clone.token")
EXTENDED_CLONE_TOKEN: Final = _cdi("storage.extended.clone.token")
PERMISSIVE_CLONE: Final = _cdi("permissiveClone")
CLONE_TYPE: Final = _cdi("cloneType")
CLONE_PHASE: Final = _cdi("clonePhase")
CLONE_ERROR: Final = _cdi("cloneError")
CLONE_FALLBACK_REASON: Final = _cdi("cloneFallbackReason")
DATA_SOURCE_NAMESPACE: Final = _cdi("dataSourceNamespace")
CLONE_UNIQUE_ID: Final = _cdi("storage.clone.cloneUniqeId")  # sic: CDI's spelling
STORAGE_CLASS_CLONE_STRATEGY: Final = _cdi("clone-strategy")
MINIMUM_SUPPORTED_PVC_SIZE: Final = _cdi("minimumSupportedPvcSize")
# CDI caches size detection on the source PVC under this odd prefix; we keep it verbatim.
SOURCE_VIRTUAL_SIZE: Final = "cdi.Kubervirt.io/virtualSize"
SOURCE_CAPACITY: Final = "cdi.Kubervirt.io/sourceCapacity"

# --- storage classes -----------------------------------------------------------------------------
DEFAULT_STORAGE_CLASS: Final = "storageclass.kubernetes.io/is-default-class"
DEFAULT_VIRT_STORAGE_CLASS: Final = "storageclass.kubevirt.io/is-default-virt-class"
CONFIG_AUTHORITY: Final = _cdi("configAuthority")

# --- annotation values ---------------------------------------------------------------------------
CREATED_BY_CONTROLLER_VALUE: Final = "yes"

# --- annotations copied to worker pods (allow-list, reference §4.4) -------------------------------
POD_NETWORKS: Final = "k8s.v1.cni.cncf.io/networks"
POD_MULTUS_DEFAULT_NETWORK: Final = "v1.multus-cni.io/default-network"
POD_SIDECAR_INJECTION: Final = "sidecar.istio.io/inject"
POD_LINKERD_INJECTION: Final = "linkerd.io/inject"
COPIED_TO_WORKER_PODS: Final = (
    POD_NETWORKS,
    POD_MULTUS_DEFAULT_NETWORK,
    POD_SIDECAR_INJECTION,
    POD_LINKERD_INJECTION,
)
# Values a worker pod gets when the PVC does not say (CDI keeps service-mesh sidecars out of
# worker pods: an injected proxy would outlive the worker and keep the pod from completing).
POD_SIDECAR_INJECTION_DEFAULT: Final = "false"
POD_LINKERD_INJECTION_DEFAULT: Final = "disabled"

# --- finalizers ----------------------------------------------------------------------------------
DATA_VOLUME_FINALIZER: Final = _cdi("dataVolumeFinalizer")
IMPORT_IMAGE_STREAM_FINALIZER: Final = _cdi("importImageStream")
CLONE_SOURCE_FINALIZER: Final = _cdi("cloneSource")
CLONE_POPULATOR_FINALIZER: Final = _cdi("clonePopulator")

# --- labels --------------------------------------------------------------------------------------
LABEL_APP: Final = "app"
LABEL_APP_VALUE: Final = "containerized-data-importer"
LABEL_COMPONENT: Final = "cdi.kubevirt.io"
LABEL_COMPONENT_IMPORTER: Final = "importer"
LABEL_COMPONENT_UPLOAD_SERVER: Final = "cdi-upload-server"
LABEL_COMPONENT_CLONE_SOURCE: Final = "cdi-clone-source"
LABEL_PROMETHEUS: Final = "prometheus.cdi.kubevirt.io"
LABEL_UPLOAD_TARGET: Final = _cdi("uploadTarget")
LABEL_SERVICE: Final = "service"
LABEL_CLONE_SOURCE_PVC_UID: Final = _cdi("hostAssistedSourcePodCloneSource")
LABEL_APPLY_STORAGE_PROFILE: Final = _cdi("applyStorageProfile")
LABEL_DATA_IMPORT_CRON: Final = _cdi("dataImportCron")
LABEL_FILLING_UP_ALERT: Final = "alerts.k8s.io/KubePersistentVolumeFillingUp"
LABEL_FILLING_UP_ALERT_DISABLED: Final = "disabled"
LABEL_PROMETHEUS_VALUE: Final = "true"
LABEL_EXCLUDE_FROM_BACKUP: Final = "velero.io/exclude-from-backup"
