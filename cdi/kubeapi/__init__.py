"""cdi.kubeapi: the embedded, Kubernetes-compatible API server used by `cdi server` on one machine.

It serves core, storage, RBAC and apiextensions kinds plus every installed CRD, keeps objects in
SQLite (`store`), and speaks the same protocol as kube-apiserver (discovery, list/watch with
resourceVersion, patch, finalizers, status subresource, `Status` errors), so that our async client
and the real `kubectl` work against it unchanged. On a real cluster none of this runs.
"""
