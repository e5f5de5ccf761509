"""cdi.image: the data-plane toolkit (inspector, compression, qemu-img, nbdkit). No Kubernetes.

Modules: `formats` (pure-Python streaming inspector), `compression`, `qemuimg`, `nbdkit`,
`errors`. Only `cdi.api` of ours may be imported here.
"""
