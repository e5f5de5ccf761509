"""Worker environment variable names: the controller-to-worker contract (reference §5.2/6.2/7.3).

CDI's names are kept exactly; the `CDI_*` path overrides are ours, so the local node agent and the
tests can run a worker outside a container where `/data` and `/dev/termination-log` do not exist.
"""

from __future__ import annotations

from typing import Final

# --- importer (CDI) ------------------------------------------------------------------------------
IMPORTER_SOURCE: Final = "IMPORTER_SOURCE"
IMPORTER_ENDPOINT: Final = "IMPORTER_ENDPOINT"
IMPORTER_CONTENTTYPE: Final = "IMPORTER_CONTENTTYPE"
IMPORTER_IMAGE_SIZE: Final = "IMPORTER_IMAGE_SIZE"
IMPORTER_ACCESS_KEY_ID: Final = "IMPORTER_ACCESS_KEY_ID"
IMPORTER_SECRET_KEY: Final = "IMPORTER_SECRET_KEY"
IMPORTER_CERT_DIR: Final = "IMPORTER_CERT_DIR"
IMPORTER_PROXY_CERT_DIR: Final = "IMPORTER_PROXY_CERT_DIR"
IMPORTER_CHECKSUM: Final = "IMPORTER_CHECKSUM"
IMPORTER_EXTRA_HEADER_PREFIX: Final = "IMPORTER_EXTRA_HEADER_"
IMPORTER_DISK_ID: Final = "IMPORTER_DISK_ID"
IMPORTER_UUID: Final = "IMPORTER_UUID"
IMPORTER_BACKING_FILE: Final = "IMPORTER_BACKING_FILE"
IMPORTER_THUMBPRINT: Final = "IMPORTER_THUMBPRINT"
IMPORTER_PULL_METHOD: Final = "IMPORTER_PULL_METHOD"
IMPORTER_READY_FILE: Final = "IMPORTER_READY_FILE"
IMPORTER_DONE_FILE: Final = "IMPORTER_DONE_FILE"
IMPORTER_CURRENT_CHECKPOINT: Final = "IMPORTER_CURRENT_CHECKPOINT"
IMPORTER_PREVIOUS_CHECKPOINT: Final = "IMPORTER_PREVIOUS_CHECKPOINT"
IMPORTER_FINAL_CHECKPOINT: Final = "IMPORTER_FINAL_CHECKPOINT"
IMPORTER_REGISTRY_IMAGE_ARCHITECTURE: Final = "IMPORTER_REGISTRY_IMAGE_ARCHITECTURE"
OWNER_UID: Final = "OWNER_UID"
FILESYSTEM_OVERHEAD: Final = "FILESYSTEM_OVERHEAD"
INSECURE_TLS: Final = "INSECURE_TLS"
PREALLOCATION: Final = "PREALLOCATION"
CACHE_MODE: Final = "CACHE_MODE"
CACHE_MODE_TRY_NONE: Final = "TRYNONE"
GOOGLE_APPLICATION_CREDENTIALS: Final = "GOOGLE_APPLICATION_CREDENTIALS"
# Both spellings are honoured, as curl and Go's net/http do.
PROXY_VARIABLES: Final = (
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
)
# The names the controller sets (CDI sets the lower-case ones only).
HTTP_PROXY: Final = "http_proxy"
HTTPS_PROXY: Final = "https_proxy"
NO_PROXY: Final = "no_proxy"
# Keys of the Secret named by a source's secretRef (IMPORTER_ACCESS_KEY_ID / IMPORTER_SECRET_KEY).
SECRET_KEY_ACCESS_KEY_ID: Final = "accessKeyId"
SECRET_KEY_SECRET_KEY: Final = "secretKey"

# --- upload server (CDI) -------------------------------------------------------------------------
UPLOAD_IMAGE_SIZE: Final = "UPLOAD_IMAGE_SIZE"
TLS_KEY_FILE: Final = "TLS_KEY_FILE"
TLS_CERT_FILE: Final = "TLS_CERT_FILE"
CLIENT_CERT_FILE: Final = "CLIENT_CERT_FILE"
CLIENT_NAME: Final = "CLIENT_NAME"
DESTINATION: Final = "DESTINATION"
DEADLINE: Final = "DEADLINE"
TLS_CIPHERS: Final = "TLS_CIPHERS"
TLS_MIN_VERSION: Final = "TLS_MIN_VERSION"
LISTEN_ADDRESS: Final = "LISTEN_ADDRESS"
LISTEN_PORT: Final = "LISTEN_PORT"
APISERVER_PUBLIC_KEY: Final = "APISERVER_PUBLIC_KEY"

# --- clone source (CDI) --------------------------------------------------------------------------
CLIENT_KEY: Final = "CLIENT_KEY"
CLIENT_CERT: Final = "CLIENT_CERT"
SERVER_CA_CERT: Final = "SERVER_CA_CERT"
UPLOAD_URL: Final = "UPLOAD_URL"
VOLUME_MODE: Final = "VOLUME_MODE"
MOUNT_POINT: Final = "MOUNT_POINT"

# --- ours: path overrides so workers run outside a container --------------------------------------
CDI_DATA_DIR: Final = "CDI_DATA_DIR"
CDI_BLOCK_DEVICE: Final = "CDI_BLOCK_DEVICE"
CDI_SCRATCH_DIR: Final = "CDI_SCRATCH_DIR"
CDI_TERMINATION_LOG: Final = "CDI_TERMINATION_LOG"
CDI_METRICS_ADDR: Final = "CDI_METRICS_ADDR"
CDI_EXTRA_HEADERS_DIR: Final = "CDI_EXTRA_HEADERS_DIR"
CDI_STALL_TIMEOUT: Final = "CDI_STALL_TIMEOUT"

# --- in-pod paths (reference Appendix A) ----------------------------------------------------------
DEFAULT_DATA_DIR: Final = "/data"
DISK_IMAGE_NAME: Final = "disk.img"
DEFAULT_BLOCK_DEVICE: Final = "/dev/cdi-block-volume"
DEFAULT_SCRATCH_DIR: Final = "/scratch"
SCRATCH_IMAGE_NAME: Final = "tmpimage"
DEFAULT_TERMINATION_LOG: Final = "/dev/termination-log"
DEFAULT_CERT_DIR: Final = "/certs"
DEFAULT_PROXY_CERT_DIR: Final = "/proxycerts/"
DEFAULT_EXTRA_HEADERS_DIR: Final = "/extraheaders"
CLONE_SOURCE_MOUNT: Final = "/var/run/cdi/clone/source"
METRICS_PORT: Final = 8443
UPLOAD_SERVER_PORT: Final = 8443
QEMU_UID: Final = 107
DISK_IMAGE_MODE: Final = 0o660
