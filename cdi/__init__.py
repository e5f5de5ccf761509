"""cdi: a containerized data importer and cloner for VM disks, wire-compatible with KubeVirt CDI.

The control plane and the shared libraries live here; the workers live in the sibling packages
`importer`, `uploadproxy` and `cloner`. See DESIGN.md for the layering.
"""

__version__ = "0.1.0"
