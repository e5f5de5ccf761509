"""cdi.provisioner: local volumes for the all-in-one server (directories and fixed-size files).

`run_provisioner` is started by `cdi server`; `volume_path` tells the node agent where a PV's
data is. On a real cluster none of this runs: the cluster's StorageClasses provision volumes.
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

__all__ = [
    "DEFAULT_CLASS",
    "PROVISIONER",
    "WFFC_CLASS",
    "ProvisionerSettings",
    "run_provisioner",
    "volume_path",
    "volumes_dir",
]
