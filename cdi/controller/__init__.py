"""cdi.controller: the control plane's reconcilers and the runtime that drives them.

`runtime` owns the reactor (list-then-watch per kind, per-object queue, bounded workers,
back-off); the reconcilers (DataVolume, importing, uploading, cloning, vm) sit on top of it and
talk to the API only through `cdi.kube.Client`, so the same code runs against the embedded API
server of `cdi server` and against a real cluster. Workers are started as pods, never imported.
"""
