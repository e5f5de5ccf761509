"""cdi.kube: the async Kubernetes client every control-plane process uses, on aiohttp.

The same code talks to the embedded API server (`cdi server`) and to a real cluster. Owns
configuration loading (kubeconfig, in-cluster), the error tree, retries, and list/watch.
"""

from cdi.kube.client import Client, WatchEvent
from cdi.kube.config import ClientConfig, load_config
from cdi.kube.errors import (
    AlreadyExists,
    ApiError,
    Conflict,
    Forbidden,
    Gone,
    Invalid,
    NotFound,
    ServerError,
    TooManyRequests,
    Unauthorized,
)

__all__ = [
    "AlreadyExists",
    "ApiError",
    "Client",
    "ClientConfig",
    "Conflict",
    "Forbidden",
    "Gone",
    "Invalid",
    "NotFound",
    "ServerError",
    "TooManyRequests",
    "Unauthorized",
    "WatchEvent",
    "load_config",
]
