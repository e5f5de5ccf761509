"""cdi.provisioner: local volumes for the all-in-one server (directories and fixed-size files),
their snapshots, restores and clones (reflink copies when the file system can share extents).

`run_provisioner` is started by `cdi server`; `volume_path` tells the node agent where a PV's
data is. On a real cluster none of this runs: the cluster's StorageClasses provision volumes
and its CSI snapshotter takes snapshots.
"""

from cdi.provisioner.local import (
    DEFAULT_CLASS,
    PROVISIONER,
    WFFC_CLASS,
    ProvisionerSettings,
    run_provisioner,
    volume_path,
    volumes_dir,
)
from cdi.provisioner.snapshots import SNAPSHOT_CLASS

__all__ = [
    "DEFAULT_CLASS",
    "PROVISIONER",
    "SNAPSHOT_CLASS",
    "WFFC_CLASS",
    "ProvisionerSettings",
    "run_provisioner",
    "volume_path",
    "volumes_dir",
]
