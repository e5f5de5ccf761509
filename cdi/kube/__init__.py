"""cdi.kube: the async Kubernetes client wrapper (arrives with the all-in-one server issue)."""
