"""Where a pod's files live on this machine, and reading container logs back for `kubectl logs`.

Owns the on-disk layout under the agent's root (the server's data dir):

    <root>/pods/<namespace>/<pod>/<container>.log            stdout+stderr of the current run
    <root>/pods/<namespace>/<pod>/<container>.previous.log   the run before (after a restart)
    <root>/pods/<namespace>/<pod>/<container>/termination-log   CDI_TERMINATION_LOG
    <root>/pods/<namespace>/<pod>/<container>/               cwd and HOME of the process
    <root>/pods/<namespace>/<pod>/volumes/<volume>/          secret, configMap, emptyDir volumes

Used by `cdi.agent.runner` (writes) and by the embedded API server's `pods/log` route through
`read_log`. Names come from URLs there, so every name is checked to be a DNS label before it
becomes a path; nothing here reads outside `<root>/pods`.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Final

_LABEL: Final = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# A pod name may be a DNS subdomain (dots allowed), a container name is a DNS label.
_SUBDOMAIN: Final = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
LOG_SUFFIX: Final = ".log"
PREVIOUS_SUFFIX: Final = ".previous.log"
TERMINATION_LOG: Final = "termination-log"
#: The kubelet's FallbackToLogsOnError takes at most this many last lines and bytes of the log.
FALLBACK_LINES: Final = 80
FALLBACK_BYTES: Final = 2048


class LogNotFound(LookupError):
    """No log for that pod or container (yet); the message says which, as kubectl shows it."""


class ContainerRequired(LookupError):
    """The pod has several containers and the request did not name one."""


def pods_dir(root: Path) -> Path:
    return root / "pods"


def pod_dir(root: Path, namespace: str, name: str) -> Path:
    if not _LABEL.match(namespace) or not _SUBDOMAIN.match(name) or ".." in name:
        raise LogNotFound(f'pods "{name}" not found')
    return pods_dir(root) / namespace / name


def container_dir(root: Path, namespace: str, name: str, container: str) -> Path:
    _check_container(container)
    return pod_dir(root, namespace, name) / container


def log_path(
    root: Path, namespace: str, name: str, container: str, *, previous: bool = False
) -> Path:
    _check_container(container)
    suffix = PREVIOUS_SUFFIX if previous else LOG_SUFFIX
    return pod_dir(root, namespace, name) / f"{container}{suffix}"


def termination_log_path(root: Path, namespace: str, name: str, container: str) -> Path:
    return container_dir(root, namespace, name, container) / TERMINATION_LOG


def _check_container(container: str) -> None:
    if not _LABEL.match(container):
        raise LogNotFound(f'container "{container}" not found')


def tail(text: str, *, lines: int = FALLBACK_LINES, max_bytes: int = FALLBACK_BYTES) -> str:
    """The last `lines` lines of `text`, cut to its last `max_bytes` bytes (kubelet's rule)."""
    kept = "".join(text.splitlines(keepends=True)[-lines:])
    raw = kept.encode()
    if len(raw) > max_bytes:
        kept = raw[-max_bytes:].decode(errors="ignore")
    return kept


def _read(root: Path, namespace: str, name: str, container: str | None, previous: bool) -> str:
    directory = pod_dir(root, namespace, name)
    if container is None:
        names = sorted(
            p.name[: -len(LOG_SUFFIX)]
            for p in directory.glob(f"*{LOG_SUFFIX}")
            if not p.name.endswith(PREVIOUS_SUFFIX)
        )
        if not names:
            raise LogNotFound(f'pod "{name}" has no container logs yet: it is waiting to start')
        if len(names) > 1:
            raise ContainerRequired(
                f"a container name must be specified for pod {name}, "
                f"choose one of: [{' '.join(names)}]"
            )
        container = names[0]
    path = log_path(root, namespace, name, container, previous=previous)
    try:
        return path.read_bytes().decode(errors="replace")
    except FileNotFoundError:
        if previous:
            raise LogNotFound(
                f'previous terminated container "{container}" in pod "{name}" not found'
            ) from None
        raise LogNotFound(
            f'container "{container}" in pod "{name}" is waiting to start or does not exist'
        ) from None


async def read_log(
    root: Path, namespace: str, name: str, container: str | None, *, previous: bool = False
) -> str:
    """A container's log as `kubectl logs` shows it (`previous`: the run before the last
    restart). Without `container`, the pod's only container. Raises LogNotFound or
    ContainerRequired (a LookupError) with the message kubectl should print."""
    return await asyncio.to_thread(_read, root, namespace, name, container, previous)
