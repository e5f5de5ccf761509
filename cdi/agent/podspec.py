"""What a pod spec means on this machine: local paths for its volumes, a container's env and argv.

Owns the translation from the container view (paths inside a container filesystem) to the local
process view, so that a worker written for CDI's pods runs unchanged:

* Volumes: a PVC is its PV's data (`cdi.provisioner.volume_path`: a directory, or a file for
  Block); secret and configMap volumes are written out as files (0644 unless the spec says
  otherwise) under the pod directory; emptyDir is a directory there; hostPath is the path itself.
* The worker path variables (CDI's worker contract, `cdi.api.env`): a volume mounted at `/data`
  sets CDI_DATA_DIR, at `/scratch` CDI_SCRATCH_DIR, at `/extraheaders` CDI_EXTRA_HEADERS_DIR, a
  `volumeDevices` entry at `/dev/cdi-block-volume` sets CDI_BLOCK_DEVICE; CDI_TERMINATION_LOG is
  always the container's own file. A well-known path the pod does not mount points at a path that
  does not exist, so a worker never finds the host's `/data` by accident.
* Every mount and device path also appears as `CDI_MOUNT_<PATH>`: the path upper-cased with each
  run of other characters turned into `_` (`/etc/creds` -> `CDI_MOUNT_ETC_CREDS`), for workers
  and test commands that need a mount no variable names.
* An env value or argv word that is a mount path, or a path under one, is rewritten to the local
  path (`IMPORTER_CERT_DIR=/certs` -> the secret's directory), as it would resolve in a container.
* env: plain values with `$(VAR)` expansion, `valueFrom` secretKeyRef / configMapKeyRef (read
  through the API), fieldRef (metadata.name, namespace, uid, labels/annotations, spec.nodeName,
  spec.serviceAccountName, status.podIP, status.hostIP), resourceFieldRef (limits/requests of
  cpu and memory), and `envFrom`. On top of the pod's own: PATH (the directory of the running
  Python first, so `cdi-importer` is ours), HOME and cwd (the container directory), HOSTNAME,
  POD_IP, and CDI_METRICS_ADDR=<pod ip>:8443 unless the pod sets it (each pod has its own
  loopback address, so every worker can listen on its usual port).
* Limits: `resources.limits.memory` in bytes and `resources.limits.cpu` in cores, for the runner
  to enforce (memory by a watchdog on resident memory, CPU by duty cycling).

Used by `cdi.agent.runner`. Reads the API, writes only under the pod directory, starts nothing.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path, PurePosixPath
from typing import Any, Final

from cdi.api import env as worker_env
from cdi.api import parse_quantity, parse_size
from cdi.api.groups import CONFIG_MAP, PERSISTENT_VOLUME, PERSISTENT_VOLUME_CLAIM, SECRET
from cdi.api.quantity import QuantityError
from cdi.kube.client import Client
from cdi.kube.errors import NotFound
from cdi.provisioner import volume_path

Obj = dict[str, Any]

# importer/settings.py reads this one; it is not (yet) in cdi.api.env.
CDI_EXTRA_HEADERS_DIR: Final = worker_env.CDI_EXTRA_HEADERS_DIR
EXTRA_HEADERS_MOUNT: Final = "/extraheaders"
MOUNT_ENV_PREFIX: Final = "CDI_MOUNT_"
HOST_IP: Final = "127.0.0.1"
#: Mount path -> the worker variable that names it (Filesystem mounts).
MOUNT_VARIABLES: Final = {
    worker_env.DEFAULT_DATA_DIR: worker_env.CDI_DATA_DIR,
    worker_env.DEFAULT_SCRATCH_DIR: worker_env.CDI_SCRATCH_DIR,
    EXTRA_HEADERS_MOUNT: CDI_EXTRA_HEADERS_DIR,
}
#: Device path -> the worker variable that names it (Block volumes).
DEVICE_VARIABLES: Final = {worker_env.DEFAULT_BLOCK_DEVICE: worker_env.CDI_BLOCK_DEVICE}
#: Variables of the agent's own environment that containers get too (locale, time zone, tmp).
_PASSTHROUGH: Final = ("LANG", "LC_ALL", "TZ", "TMPDIR")
_REFERENCE: Final = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")
#: The smallest CPU limit applied, in cores: the kubelet's smallest CFS quota is 1 ms per 100 ms
#: period. A limit of 0 means no limit, as under a kubelet.
MIN_CPU_LIMIT: Final = Decimal("0.01")


class ConfigError(Exception):
    """The pod cannot start yet (a missing secret, config map or key); retried, as the kubelet
    does, and shown as the container's waiting message."""


class VolumeNotReady(Exception):
    """A PVC the pod uses does not exist or is not bound yet."""


@dataclass(frozen=True, slots=True)
class LocalVolume:
    name: str
    path: Path
    block: bool = False
    capacity: int | None = None
    """Bytes, for PVC volumes: the largest file a process mounting it may write."""


@dataclass(frozen=True, slots=True)
class ContainerPlan:
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    memory_limit: int | None
    file_size_limit: int | None
    cpu_limit: float | None = None
    """Cores (`resources.limits.cpu`; "500m" is 0.5), at least `MIN_CPU_LIMIT`; None: no limit."""


def mount_variable(path: str) -> str:
    """`/etc/creds` -> `CDI_MOUNT_ETC_CREDS` (see the module docstring)."""
    return MOUNT_ENV_PREFIX + (re.sub(r"[^A-Z0-9]+", "_", path.upper()).strip("_") or "ROOT")


def expand(value: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: defined names are replaced, unknown ones kept as written,
    `$$` is a literal `$`."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _REFERENCE.sub(one, value)


def _safe_relative(path: str) -> PurePosixPath:
    """A key or item path inside a volume directory; never absolute, never climbing out."""
    rel = PurePosixPath(path)
    if not path or rel.is_absolute() or ".." in rel.parts:
        raise ConfigError(f"invalid path {path!r} in volume items")
    return rel


def _gather(root: Path, base: str, below: Mapping[str, Path]) -> Path:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for mount, local in below.items():
        link = root / _safe_relative(mount[len(base.rstrip("/")) + 1 :].strip("/"))
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(local)
    return root


def _write_files(directory: Path, files: Mapping[str, bytes], mode: int) -> None:
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    for rel, data in files.items():
        target = directory / _safe_relative(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        target.chmod(mode)


def _select(
    data: Mapping[str, bytes], items: list[Obj] | None, *, what: str, optional: bool
) -> dict[str, bytes]:
    if not items:
        return dict(data)
    chosen = {}
    for item in items:
        key = str(item.get("key", ""))
        if key not in data:
            if optional:
                continue
            raise ConfigError(f"couldn't find key {key} in {what}")
        chosen[str(item.get("path") or key)] = data[key]
    return chosen


def _secret_bytes(secret: Obj) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for key, value in (secret.get("stringData") or {}).items():
        out[key] = str(value).encode()
    for key, value in (secret.get("data") or {}).items():
        try:
            out[key] = base64.b64decode(str(value), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"secret data {key!r} is not base64") from None
    return out


def _config_map_bytes(cm: Obj) -> dict[str, bytes]:
    out = {key: str(value).encode() for key, value in (cm.get("data") or {}).items()}
    for key, value in (cm.get("binaryData") or {}).items():
        try:
            out[key] = base64.b64decode(str(value), validate=True)
        except (binascii.Error, ValueError):
            raise ConfigError(f"configmap binaryData {key!r} is not base64") from None
    return out


class PodContext:
    """Lookups of one pod's secrets and config maps, each read once per container start."""

    def __init__(self, client: Client, pod: Obj) -> None:
        self.client = client
        self.pod = pod
        self.namespace = str(pod["metadata"]["namespace"])
        self._secrets: dict[str, Obj | None] = {}
        self._config_maps: dict[str, Obj | None] = {}

    async def secret(self, name: str) -> Obj | None:
        if name not in self._secrets:
            try:
                self._secrets[name] = await self.client.get(SECRET, name, self.namespace)
            except NotFound:
                self._secrets[name] = None
        return self._secrets[name]

    async def config_map(self, name: str) -> Obj | None:
        if name not in self._config_maps:
            try:
                self._config_maps[name] = await self.client.get(CONFIG_MAP, name, self.namespace)
            except NotFound:
                self._config_maps[name] = None
        return self._config_maps[name]

    async def secret_data(self, name: str, *, optional: bool) -> dict[str, bytes]:
        secret = await self.secret(name)
        if secret is None:
            if optional:
                return {}
            raise ConfigError(f'secret "{name}" not found')
        return _secret_bytes(secret)

    async def config_map_data(self, name: str, *, optional: bool) -> dict[str, bytes]:
        cm = await self.config_map(name)
        if cm is None:
            if optional:
                return {}
            raise ConfigError(f'configmap "{name}" not found')
        return _config_map_bytes(cm)


async def claim_volume(client: Client, namespace: str, claim: str) -> LocalVolume:
    """The local data of a PVC, which must be bound to a PV with a local path."""
    try:
        pvc = await client.get(PERSISTENT_VOLUME_CLAIM, claim, namespace)
    except NotFound:
        raise VolumeNotReady(f'persistentvolumeclaim "{claim}" not found') from None
    pv_name = (pvc.get("spec") or {}).get("volumeName")
    if not pv_name or (pvc.get("status") or {}).get("phase") != "Bound":
        raise VolumeNotReady(f'persistentvolumeclaim "{claim}" is not bound')
    try:
        pv = await client.get(PERSISTENT_VOLUME, pv_name)
    except NotFound:
        raise VolumeNotReady(f'persistentvolume "{pv_name}" not found') from None
    path = volume_path(pv)
    if path is None:
        raise ConfigError(f'persistentvolume "{pv_name}" has no local or hostPath path')
    spec = pv.get("spec") or {}
    try:
        capacity = parse_size(str((spec.get("capacity") or {}).get("storage") or ""))
    except QuantityError:
        capacity = None
    return LocalVolume(claim, path, block=spec.get("volumeMode") == "Block", capacity=capacity)


async def resolve_volumes(ctx: PodContext, pod_dir: Path) -> dict[str, LocalVolume]:
    """Every volume of the pod as a local path, writing secret/configMap/emptyDir volumes under
    `pod_dir/volumes`. Raises VolumeNotReady (PVCs) or ConfigError (everything else)."""
    volumes: dict[str, LocalVolume] = {}
    base = pod_dir / "volumes"
    for vol in (ctx.pod.get("spec") or {}).get("volumes") or []:
        name = str(vol.get("name"))
        here = base / _safe_relative(name)
        if "persistentVolumeClaim" in vol:
            claim = str(vol["persistentVolumeClaim"].get("claimName"))
            local = await claim_volume(ctx.client, ctx.namespace, claim)
            volumes[name] = LocalVolume(name, local.path, local.block, local.capacity)
        elif "secret" in vol:
            src = vol["secret"]
            optional = bool(src.get("optional"))
            data = await ctx.secret_data(str(src.get("secretName")), optional=optional)
            files = _select(
                data, src.get("items"), what=f"secret {src.get('secretName')}", optional=optional
            )
            _write_files(here, files, int(src.get("defaultMode", 0o644)))
            volumes[name] = LocalVolume(name, here)
        elif "configMap" in vol:
            src = vol["configMap"]
            optional = bool(src.get("optional"))
            data = await ctx.config_map_data(str(src.get("name")), optional=optional)
            files = _select(
                data, src.get("items"), what=f"configmap {src.get('name')}", optional=optional
            )
            _write_files(here, files, int(src.get("defaultMode", 0o644)))
            volumes[name] = LocalVolume(name, here)
        elif "emptyDir" in vol:
            here.mkdir(parents=True, exist_ok=True)
            volumes[name] = LocalVolume(name, here)
        elif "hostPath" in vol:
            volumes[name] = LocalVolume(name, Path(str(vol["hostPath"].get("path"))))
        else:
            kinds = sorted(k for k in vol if k != "name")
            raise ConfigError(f"volume {name!r}: type {kinds} is not supported by the local agent")
    return volumes


def claims_of(pod: Obj) -> list[str]:
    """Names of the PVCs the pod uses."""
    return [
        str(v["persistentVolumeClaim"].get("claimName"))
        for v in (pod.get("spec") or {}).get("volumes") or []
        if "persistentVolumeClaim" in v
    ]


def _mounts(
    container: Obj, volumes: Mapping[str, LocalVolume]
) -> tuple[dict[str, Path], list[LocalVolume]]:
    """Container path -> local path for every mount and device, and the volumes it uses."""
    table: dict[str, Path] = {}
    used: list[LocalVolume] = []
    for mount in container.get("volumeMounts") or []:
        vol = volumes.get(str(mount.get("name")))
        if vol is None:
            raise ConfigError(f"volumeMount {mount.get('name')!r} names no volume of the pod")
        local = vol.path
        if mount.get("subPath"):
            local = local / _safe_relative(str(mount["subPath"]))
            if not vol.block:
                local.mkdir(parents=True, exist_ok=True)
        table[str(mount.get("mountPath")).rstrip("/") or "/"] = local
        used.append(vol)
    for device in container.get("volumeDevices") or []:
        vol = volumes.get(str(device.get("name")))
        if vol is None:
            raise ConfigError(f"volumeDevice {device.get('name')!r} names no volume of the pod")
        table[str(device.get("devicePath"))] = vol.path
        used.append(vol)
    return table, used


def rewrite_path(value: str, table: Mapping[str, Path]) -> str:
    """`value` with a leading container mount path replaced by its local path (longest wins)."""
    if not value.startswith("/"):
        return value
    for mount in sorted(table, key=len, reverse=True):
        if mount == "/":
            continue
        if value == mount:
            return str(table[mount])
        if value.startswith(mount + "/"):
            return str(table[mount]) + value[len(mount) :]
    return value


def _field(pod: Obj, path: str, pod_ip: str) -> str:
    md = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    simple = {
        "metadata.name": md.get("name"),
        "metadata.namespace": md.get("namespace"),
        "metadata.uid": md.get("uid"),
        "spec.nodeName": spec.get("nodeName"),
        "spec.serviceAccountName": spec.get("serviceAccountName") or "default",
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": HOST_IP,
        "status.hostIPs": HOST_IP,
    }
    if path in simple:
        return str(simple[path] or "")
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']*)'\]", path)
    if m:
        return str((md.get(m.group(1)) or {}).get(m.group(2), ""))
    raise ConfigError(f"fieldRef {path!r} is not supported")


def _resource_field(container: Obj, ref: Obj) -> str:
    resource = str(ref.get("resource", ""))
    kind, _, what = resource.partition(".")
    if kind not in ("limits", "requests") or what not in ("cpu", "memory"):
        raise ConfigError(f"resourceFieldRef {resource!r} is not supported")
    raw = ((container.get("resources") or {}).get(kind) or {}).get(what)
    try:
        divisor = parse_quantity(str(ref.get("divisor") or "1"))
        if raw is None:
            # Kubernetes reports the node's capacity for an unset limit; ours is this machine.
            value = (
                Decimal(os.cpu_count() or 1)
                if what == "cpu"
                else Decimal(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
            )
        else:
            value = parse_quantity(str(raw))
    except QuantityError as err:
        raise ConfigError(f"resourceFieldRef {resource!r}: {err}") from None
    if divisor <= 0:
        raise ConfigError(f"resourceFieldRef {resource!r}: divisor must be positive")
    return str(math.ceil(value / divisor))


async def _value_from(
    ctx: PodContext, container: Obj, source: Obj, pod_ip: str, name: str
) -> str | None:
    for field, kind, fetch in (
        ("secretKeyRef", "Secret", ctx.secret_data),
        ("configMapKeyRef", "ConfigMap", ctx.config_map_data),
    ):
        if field not in source:
            continue
        ref = source[field]
        optional = bool(ref.get("optional"))
        data = await fetch(str(ref.get("name")), optional=optional)
        key = str(ref.get("key"))
        if key not in data:
            if optional:
                return None
            raise ConfigError(
                f"couldn't find key {key} in {kind} {ctx.namespace}/{ref.get('name')}"
            )
        return data[key].decode(errors="replace")
    if "fieldRef" in source:
        return _field(ctx.pod, str(source["fieldRef"].get("fieldPath")), pod_ip)
    if "resourceFieldRef" in source:
        return _resource_field(container, source["resourceFieldRef"])
    raise ConfigError(f"env {name}: valueFrom {sorted(source)} is not supported")


def search_path() -> str:
    """PATH for containers: our interpreter's directory first (so `cdi-importer` is the one of
    this installation), then the agent's own PATH."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])


def find_executable(command: str, path: str) -> str | None:
    """`command` as a file to execute: a name is looked up on `path`; an absolute path that does
    not exist here (`/usr/bin/cdi-importer` in an image) falls back to its base name on `path`."""
    if "/" in command:
        if os.access(command, os.X_OK) and not os.path.isdir(command):
            return command
        command = os.path.basename(command)
    return shutil.which(command, path=path)


async def plan_container(
    ctx: PodContext,
    container: Obj,
    volumes: Mapping[str, LocalVolume],
    *,
    pod_ip: str,
    workdir: Path,
    termination_log: Path,
) -> ContainerPlan:
    """argv, env, cwd and limits of one container start. Raises ConfigError."""
    table, used = _mounts(container, volumes)
    message_path = str(container.get("terminationMessagePath") or "")
    if message_path:
        table[message_path] = termination_log
    env: dict[str, str] = {"PATH": search_path()}
    for name in _PASSTHROUGH:
        if name in os.environ:
            env[name] = os.environ[name]
    env.update(
        {
            "HOME": str(workdir),
            "HOSTNAME": str(ctx.pod["metadata"]["name"]),
            "POD_IP": pod_ip,
            worker_env.CDI_METRICS_ADDR: f"{pod_ip}:{worker_env.METRICS_PORT}",
        }
    )
    # Unmounted well-known paths point at nothing rather than at this machine's /data.
    absent = workdir / "not-mounted"
    for mount_path, variable in (MOUNT_VARIABLES | DEVICE_VARIABLES).items():
        local = table.get(mount_path)
        if local is None:
            # Volumes mounted below a well-known path (CDI mounts each secret of extra headers
            # at /extraheaders/<i>) are gathered into one directory of symlinks, as the
            # container would see them under that path.
            below = {m: p for m, p in table.items() if m.startswith(mount_path.rstrip("/") + "/")}
            if below:
                local = _gather(workdir / "gathered" / mount_path.strip("/"), mount_path, below)
        env[variable] = str(local if local is not None else absent / mount_path.strip("/"))
    for mount_path, local in table.items():
        env[mount_variable(mount_path)] = str(local)

    own: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        prefix = str(source.get("prefix") or "")
        optional_data: dict[str, bytes]
        if "secretRef" in source:
            ref = source["secretRef"]
            optional_data = await ctx.secret_data(
                str(ref.get("name")), optional=bool(ref.get("optional"))
            )
        elif "configMapRef" in source:
            ref = source["configMapRef"]
            optional_data = await ctx.config_map_data(
                str(ref.get("name")), optional=bool(ref.get("optional"))
            )
        else:
            raise ConfigError(f"envFrom {sorted(source)} is not supported")
        for key, raw in optional_data.items():
            own[prefix + key] = raw.decode(errors="replace")
    for item in container.get("env") or []:
        name = str(item.get("name"))
        if "valueFrom" in item:
            value = await _value_from(ctx, container, item["valueFrom"], pod_ip, name)
            if value is None:
                continue
        else:
            value = expand(str(item.get("value") or ""), {**env, **own})
        own[name] = value
    # The pod's own values win over the agent's defaults, seen through the mount table.
    env.update({name: rewrite_path(value, table) for name, value in own.items()})
    env[worker_env.CDI_TERMINATION_LOG] = str(termination_log)
    env["POD_IP"] = pod_ip

    words = [expand(str(w), env) for w in container.get("command") or []]
    words += [expand(str(w), env) for w in container.get("args") or []]
    if not container.get("command"):
        raise ConfigError(
            "the container has no command: the local agent runs processes, not images; "
            "set the container's command"
        )
    argv = [rewrite_path(w, table) for w in words]

    limits = (container.get("resources") or {}).get("limits") or {}
    memory = limits.get("memory")
    try:
        memory_limit = parse_size(str(memory)) if memory is not None else None
    except QuantityError:
        raise ConfigError(f"resources.limits.memory {memory!r} is not a quantity") from None
    capacities = [v.capacity for v in used if v.capacity is not None]
    return ContainerPlan(
        argv=argv,
        env=env,
        cwd=workdir,
        memory_limit=memory_limit,
        file_size_limit=max(capacities) if capacities else None,
        cpu_limit=cpu_limit(limits.get("cpu")),
    )


def cpu_limit(value: object) -> float | None:
    """A `resources.limits.cpu` value in cores ("750m" -> 0.75, "2" -> 2.0); None when unset or
    0. Raises ConfigError."""
    if value is None:
        return None
    try:
        cores = parse_quantity(str(value))
    except QuantityError:
        raise ConfigError(f"resources.limits.cpu {value!r} is not a quantity") from None
    if cores < 0:
        raise ConfigError(f"resources.limits.cpu {value!r} is negative")
    if cores == 0:
        return None
    return float(max(cores, MIN_CPU_LIMIT))
