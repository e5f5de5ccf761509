"""The local node agent: runs the Pod objects of the all-in-one server as local processes.

Owns what a kubelet owns on a cluster node, for the one node `cdi server` is:

* Watching Pods (list-then-watch, `cdi.kube.informer`) whose `spec.nodeName` is empty or ours.
* Scheduling: a pod waits, Pending with condition PodScheduled=False (reason Unschedulable),
  until every PVC it uses is Bound. A PVC of a WaitForFirstConsumer class gets the annotation
  `volume.kubernetes.io/selected-node` (kube-scheduler's job on a cluster) so the local
  provisioner binds it. Then `spec.nodeName` is set to our node.
* Running: each container's command+args as a process (`cdi.agent.processes`) with the env,
  paths and limits `cdi.agent.podspec` derives: its own loopback address (127.0.x.y, in
  status.podIP and env POD_IP), volumes through the worker path variables, the memory limit
  enforced on resident memory by a watchdog (SIGKILL, reason OOMKilled, as the kernel's cgroup
  OOM killer does under a kubelet) with RLIMIT_AS at `address_space_factor` times the limit as a
  backstop, and RLIMIT_FSIZE at the capacity of the largest PVC the container mounts. The CPU
  limit (a rate, in cores) is applied by duty cycling, as `cpulimit` does and without cgroups:
  the CPU throttle samples the CPU time of each limited session every `cpu_period`, SIGSTOPs a
  session that used more than its share for as long as it takes to earn the excess back, then
  SIGCONTs it; a limit of at least this machine's core count needs nothing. A session is never
  left stopped: it is continued when its container ends, before SIGTERM when its pod is deleted,
  and when the agent stops. (RLIMIT_CPU is no CPU limit: it counts total CPU seconds, and would
  kill a server.)
  Init containers run first, one at a time, and must succeed.
* Reporting: status.phase Pending/Running/Succeeded/Failed, conditions, podIP, startTime and
  container statuses (running/terminated/waiting, exitCode, signal, reason Completed/Error/
  OOMKilled/StartError, message from the termination log or, with FallbackToLogsOnError, the
  log's last lines; restartCount; ready), written whole through the status subresource.
* Restarts per restartPolicy (Always, OnFailure, Never) with the kubelet's back-off: base
  doubling up to a maximum (10 s to 5 min unless configured), reset after 10 minutes of running.
* Logs: stdout+stderr to `<root>/pods/<ns>/<pod>/<container>.log` (`cdi.agent.logs`, which
  also serves `kubectl logs`).
* Deletion: a pod that is gone, or has a deletionTimestamp, has its processes' sessions sent
  SIGTERM, then SIGKILL after its grace period (capped by `max_grace`); a pod marked for deletion
  is then deleted with grace 0 (the embedded API deletes pods at once today, so usually the object
  is already gone).
* Lifetime: when the agent stops, every process it started is killed and reaped, and pod status
  is left as it was, so that a restarted agent adopts its pods: their containers are restarted per
  policy (a Never pod whose container was running fails with ContainerStatusUnknown). If the agent
  dies without stopping, PR_SET_PDEATHSIG takes its containers' processes with it; what those
  started (re-parented to init) is killed by the next agent over the same root before it adopts
  any pod (`processes.kill_leftovers`).

Started by `cdi server`: `run_agent(client, root=<data dir>, stop=...)`. Talks to the API only
through `cdi.kube.Client`. It must not run pods assigned to another node, write outside
`<root>/pods` (volumes belong to the provisioner), or leave a process behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from cdi.agent import logs
from cdi.agent.podspec import (
    HOST_IP,
    ConfigError,
    LocalVolume,
    PodContext,
    VolumeNotReady,
    claims_of,
    find_executable,
    plan_container,
    resolve_volumes,
)
from cdi.agent.probes import ReadinessProber
from cdi.agent.processes import (
    CLOCK_TICKS,
    Limits,
    SessionCpu,
    kill,
    kill_leftovers,
    resident_by_session,
    signal_processes,
    signal_session,
    spawn,
    terminate,
)
from cdi.api import PodPhase
from cdi.api import env as worker_env
from cdi.api.groups import PERSISTENT_VOLUME_CLAIM, POD, STORAGE_CLASS
from cdi.kube.client import Client, resource_path
from cdi.kube.errors import ApiError, Conflict, Invalid, NotFound
from cdi.kube.informer import Snapshot, list_then_watch

log = logging.getLogger(__name__)

Obj = dict[str, Any]

DEFAULT_NODE: Final = "cdi-local"
SELECTED_NODE: Final = "volume.kubernetes.io/selected-node"
WAIT_FOR_FIRST_CONSUMER: Final = "WaitForFirstConsumer"
DEFAULT_GRACE: Final = 30.0
#: The kubelet reads at most this much of a termination message file.
MAX_MESSAGE_BYTES: Final = 4096
#: How long the output of a finished container may take to drain into its log.
DRAIN_SECONDS: Final = 5.0
CHUNK: Final = 64 * 1024
TERMINAL: Final = (PodPhase.SUCCEEDED.value, PodPhase.FAILED.value)


@dataclass(frozen=True, slots=True)
class AgentSettings:
    node_name: str = DEFAULT_NODE
    """The node this agent is: pods with this (or no) spec.nodeName run here."""
    backoff_base: float = 10.0
    """Seconds before the first restart of a container (the kubelet's 10 s); doubles each time."""
    backoff_max: float = 300.0
    """The longest restart back-off (the kubelet's 5 minutes)."""
    backoff_reset: float = 600.0
    """A container that ran this many seconds restarts with the base back-off again."""
    poll_interval: float = 1.0
    """Seconds between checks while a pod waits for its PVCs, secrets or config maps."""
    memory_poll: float = 0.25
    """Seconds between resident-memory samples of containers with a memory limit."""
    cpu_period: float = 0.1
    """Seconds between CPU-time samples of containers with a CPU limit: about the longest a
    limited container runs before it is stopped to keep to its limit (see `CpuThrottle`)."""
    address_space_factor: int = 4
    """RLIMIT_AS is this many times the memory limit (0: none); see `processes.Limits`."""
    max_grace: float = 30.0
    """Cap on a pod's terminationGracePeriodSeconds when it is deleted."""
    shutdown_grace: float = 5.0
    """Grace between SIGTERM and SIGKILL when the agent itself stops."""


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _key(pod: Obj) -> str:
    md = pod.get("metadata") or {}
    return f"{md.get('namespace')}/{md.get('name')}"


class AddressPool:
    """Loopback addresses for pods: 127.0.x.y with x in 1..255 and y in 1..254 (127.0.0.0/24 is
    left to the host). Linux routes all of 127/8 to `lo`, so binding them needs no setup. Handed
    out round-robin, so an address is not reused right after its pod went away."""

    SIZE: Final = 255 * 254

    def __init__(self) -> None:
        self._used: set[str] = set()
        # A random start: two servers on one machine (each with its own agent and pool) would
        # otherwise hand out the same first addresses, and their pods' ports would collide.
        self._next = random.randrange(self.SIZE)

    @staticmethod
    def _at(index: int) -> str:
        return f"127.0.{1 + index // 254}.{1 + index % 254}"

    @staticmethod
    def valid(ip: str) -> bool:
        parts = ip.split(".")
        return (
            len(parts) == 4
            and parts[:2] == ["127", "0"]
            and all(p.isdigit() for p in parts[2:])
            and 1 <= int(parts[2]) <= 255
            and 1 <= int(parts[3]) <= 254
        )

    def take(self, preferred: str | None = None) -> str:
        if preferred and self.valid(preferred) and preferred not in self._used:
            self._used.add(preferred)
            return preferred
        for _ in range(self.SIZE):
            ip = self._at(self._next)
            self._next = (self._next + 1) % self.SIZE
            if ip not in self._used:
                self._used.add(ip)
                return ip
        raise RuntimeError("no free pod address in 127.0.1.1-127.0.255.254")

    def release(self, ip: str | None) -> None:
        if ip is not None:
            self._used.discard(ip)


class MemoryWatchdog:
    """Samples resident memory per session and SIGKILLs a session over its limit."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._tracked: dict[int, tuple[int, Callable[[int], None]]] = {}

    def track(self, sid: int, limit: int, on_exceeded: Callable[[int], None]) -> None:
        self._tracked[sid] = (limit, on_exceeded)

    def untrack(self, sid: int) -> None:
        self._tracked.pop(sid, None)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            if not self._tracked:
                continue
            usage = await asyncio.to_thread(resident_by_session)
            for sid, (limit, on_exceeded) in list(self._tracked.items()):
                used = usage.get(sid, 0)
                # Checked again: the container may have ended while /proc was being read.
                if sid in self._tracked and used > limit:
                    del self._tracked[sid]
                    on_exceeded(used)
                    signal_session(sid, signal.SIGKILL)


#: Seconds: a stopped session whose debt would take no longer than this to repay is continued,
#: and a running one is not stopped for so little (shorter stops cost more than they correct).
_STOP_SLACK: Final = 0.002


@dataclass
class _Throttled:
    """One CPU-limited session as the throttle sees it."""

    cores: float
    sampled: float
    """time.monotonic() of the last sample."""
    ticks: dict[int, int] = field(default_factory=dict)
    """utime+stime (clock ticks) of each process of the session at the last sample."""
    balance: float = 0.0
    """CPU seconds the session may still use (negative: what it used beyond its limit)."""
    stopped: set[int] | None = None
    """While the session is stopped: the processes sent SIGSTOP (besides its process group)."""


class CpuThrottle:
    """Applies CPU limits by duty cycling (as `cpulimit` does; no cgroup needed).

    Every `period` seconds it samples the CPU time of each limited session (`SessionCpu`: only
    those sessions are read). A session earns `cores` CPU seconds per second of wall time and
    spends what its processes used; credit is capped at one period's worth, so an idle spell
    buys no long burst. A session in debt is SIGSTOPped for debt / cores seconds, during which it
    earns the debt back, then SIGCONTed. So over time it uses `cores` CPU seconds per second,
    in bursts of about a period. A session is never left stopped: `untrack` continues it, and so
    does the end of `run` (cancelled when the agent stops), whatever ended it."""

    def __init__(self, period: float, cores: int | None = None) -> None:
        self.period = period
        self.cores = cores or os.cpu_count() or 1
        """This machine's cores: a limit of this many or more needs no throttling."""
        self._tracked: dict[int, _Throttled] = {}
        self._cpu = SessionCpu()
        self._wake = asyncio.Event()

    def track(self, sid: int, cores: float) -> bool:
        """Hold session `sid` to `cores` CPUs. False (nothing to do) when `cores` is at least
        the machine's core count."""
        if cores >= self.cores:
            return False
        self._tracked[sid] = _Throttled(cores, time.monotonic())
        self._wake.set()
        return True

    def untrack(self, sid: int) -> None:
        """Stop throttling `sid`, and continue it if it is stopped. Any sid may be given."""
        throttled = self._tracked.pop(sid, None)
        if throttled is not None and throttled.stopped is not None:
            self._continue(sid, throttled, thorough=True)

    async def run(self) -> None:
        try:
            while True:
                if not self._tracked:
                    self._cpu.forget()
                    self._wake.clear()
                    await self._wake.wait()
                wake = self._step(time.monotonic())
                await asyncio.sleep(max(0.0, wake - time.monotonic()))
        finally:
            # Cancelled (the agent stops) or crashed: no session may stay stopped.
            for sid, throttled in self._tracked.items():
                if throttled.stopped is not None:
                    self._continue(sid, throttled, thorough=True)

    def _step(self, now: float) -> float:
        """Sample every limited session, stop those in debt, continue those that paid it back.
        Returns the time.monotonic() of the next step."""
        sample = self._cpu.sample(self._tracked.keys())
        wake = now + self.period
        for sid, throttled in self._tracked.items():
            ticks = sample.get(sid, {})
            last = throttled.ticks
            used = sum(max(0, t - last.get(pid, 0)) for pid, t in ticks.items()) / CLOCK_TICKS
            earned = throttled.cores * (now - throttled.sampled)
            throttled.balance = min(
                throttled.balance + earned - used, throttled.cores * self.period
            )
            throttled.ticks, throttled.sampled = ticks, now
            owed = -throttled.balance / throttled.cores  # seconds of stop that repay the debt
            if throttled.stopped is not None:
                if owed <= _STOP_SLACK or not ticks:  # repaid, or every process ended
                    self._continue(sid, throttled)
                else:
                    wake = min(wake, now + owed)
            elif owed > _STOP_SLACK and ticks:
                throttled.stopped = set(ticks)
                signal_processes(sid, throttled.stopped, signal.SIGSTOP)
                wake = min(wake, now + owed)
        return wake

    @staticmethod
    def _continue(sid: int, throttled: _Throttled, *, thorough: bool = False) -> None:
        """SIGCONT what was stopped and what is in the session now (`thorough`: found by a
        full /proc scan, for the last time)."""
        stopped = throttled.stopped or set()
        throttled.stopped = None
        signal_processes(sid, stopped | throttled.ticks.keys(), signal.SIGCONT)
        if thorough:
            signal_session(sid, signal.SIGCONT)


@dataclass
class Container:
    """One container of a pod: its spec and what the agent knows of its current run."""

    spec: Obj
    init: bool = False
    restart_count: int = 0
    state: Obj = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: Obj = field(default_factory=dict)
    container_id: str = ""
    proc: asyncio.subprocess.Process | None = None
    started: bool = False
    """Started at least once (so the next start is a restart)."""
    done: bool = False
    """Terminated and will not run again (restart policy)."""
    exit_code: int | None = None
    oom_killed: bool = False
    backoff_step: int = 0
    probed_ready: bool = True
    """What the readiness probe says (True for a container without one)."""

    @property
    def ready(self) -> bool:
        return "running" in self.state and self.probed_ready

    @property
    def name(self) -> str:
        return str(self.spec.get("name"))

    def status(self) -> Obj:
        running = "running" in self.state
        succeeded = self.init and self.done and self.exit_code == 0
        out: Obj = {
            "name": self.name,
            "image": str(self.spec.get("image") or ""),
            "imageID": "",
            "ready": (running and self.probed_ready) or succeeded,
            "started": running,
            "restartCount": self.restart_count,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.container_id:
            out["containerID"] = self.container_id
        return out


class PodGone(Exception):
    """The pod object is gone (or is another pod with the same name now)."""


class PodRunner:
    """One pod on this node: schedules it, runs its containers, reports its status."""

    def __init__(self, agent: Agent, pod: Obj) -> None:
        self.agent = agent
        self.client = agent.client
        self.settings = agent.settings
        self.pod = pod
        md = pod["metadata"]
        self.namespace = str(md["namespace"])
        self.name = str(md["name"])
        self.uid = str(md["uid"])
        self.key = f"{self.namespace}/{self.name}"
        self.dir = logs.pod_dir(agent.root, self.namespace, self.name)
        spec = pod.get("spec") or {}
        self.policy = str(spec.get("restartPolicy") or "Always")
        self.init_containers = [Container(c, init=True) for c in spec.get("initContainers") or []]
        self.containers = [Container(c) for c in spec.get("containers") or []]
        self.volumes: dict[str, LocalVolume] = {}
        self.ip: str | None = None
        self.start_time: str | None = None
        self.scheduled = False
        self.unschedulable = ""
        self.initialized = False
        self.init_failed = False
        self.stopping = False
        self.deleting = False
        self.gone = False
        self.task: asyncio.Task[None] | None = None
        self._conditions: dict[str, Obj] = {}
        self._published: Obj | None = None
        self._publish_lock = asyncio.Lock()
        self._preferred_ip: str | None = None
        self._address_released = False
        self._adopt(pod.get("status") or {})

    @property
    def all_containers(self) -> list[Container]:
        return [*self.init_containers, *self.containers]

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"pod {self.key}")

        def done(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is not None:
                log.error("%s: pod runner failed", self.key, exc_info=task.exception())

        self.task.add_done_callback(done)

    def release_address(self) -> None:
        """Give the pod's address back, once: it may be someone else's right after."""
        if self.ip is not None and not self._address_released:
            self._address_released = True
            self.agent.pool.release(self.ip)

    def grace(self) -> float:
        md = self.pod.get("metadata") or {}
        spec = self.pod.get("spec") or {}
        grace = md.get("deletionGracePeriodSeconds")
        if not grace:
            grace = spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE)
        try:
            seconds = float(grace)
        except (TypeError, ValueError):
            seconds = DEFAULT_GRACE
        return max(0.0, min(seconds, self.settings.max_grace))

    async def stop(self, grace: float, *, publish: bool) -> None:
        """SIGTERM every running container, SIGKILL after `grace`, and end the runner. With
        `publish` the containers' final states are reported; without, the status is left for a
        restarted agent to adopt."""
        if not publish:
            self.gone = True
        self.stopping = True
        running = [c.proc for c in self.all_containers if c.proc and c.proc.returncode is None]
        if running:
            log.info("%s: stopping pids=%s grace=%.1f", self.key, [p.pid for p in running], grace)
        for p in running:
            # No more duty cycling, and continued now if stopped: a stopped process would not
            # act on SIGTERM until the grace period is over.
            self.agent.throttle.untrack(p.pid)
        await asyncio.gather(*(terminate(p, grace=grace) for p in running))
        if self.task is not None:
            if running and publish:
                # Let the container loops record how their processes ended before cancelling.
                await asyncio.wait([self.task], timeout=DRAIN_SECONDS)
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if publish:
            # Nothing runs again: a deleted pod ends in a terminal phase, as under a kubelet.
            for c in self.all_containers:
                c.done = True
            self.init_failed = not self.initialized
            await self._publish()

    async def _run(self) -> None:
        try:
            await self._schedule()
            await self._setup()
            for c in self.init_containers:
                if c.done and c.exit_code == 0:
                    continue
                await self._container_loop(c)
                if c.exit_code != 0:
                    self.init_failed = True
                    await self._publish()
                    log.info("%s: init container=%s failed; pod failed", self.key, c.name)
                    return
            self.initialized = True
            await self._publish()
            await asyncio.gather(*(self._container_loop(c) for c in self.containers if not c.done))
            await self._publish()
            log.info("%s: finished phase=%s", self.key, self._phase())
        except PodGone:
            log.info("%s: pod is gone; not running it", self.key)
        finally:
            for c in self.all_containers:
                if c.proc is not None:
                    await kill(c.proc)
            if self._phase() in TERMINAL or self.stopping:
                self.release_address()

    def _adopt(self, status: Obj) -> None:
        """Continue from a previous agent's report (the agent was restarted)."""
        self._preferred_ip = status.get("podIP")
        self.start_time = status.get("startTime")
        reported = {
            s.get("name"): s
            for s in [
                *(status.get("initContainerStatuses") or []),
                *(status.get("containerStatuses") or []),
            ]
        }
        for c in self.all_containers:
            old = reported.get(c.name)
            if not old:
                continue
            c.restart_count = int(old.get("restartCount") or 0)
            c.last_state = old.get("lastState") or {}
            state = old.get("state") or {}
            if "running" in state:
                c.started = True
                lost = {
                    "terminated": {
                        "exitCode": 137,
                        "reason": "ContainerStatusUnknown",
                        "message": "the node agent stopped while the container was running",
                        "startedAt": state["running"].get("startedAt"),
                        "finishedAt": _now(),
                    }
                }
                if self._restarts(c, 137):
                    c.last_state = lost
                else:
                    c.state, c.done, c.exit_code = lost, True, 137
            elif "terminated" in state:
                c.started = True
                code = int(state["terminated"].get("exitCode") or 0)
                if self._restarts(c, code):
                    c.last_state = state
                else:
                    c.state, c.done, c.exit_code = state, True, code
            elif "terminated" in c.last_state:
                c.started = True  # it was in back-off: the next start is a restart
        if self.init_containers and all(c.done and c.exit_code == 0 for c in self.init_containers):
            self.initialized = True

    # --- scheduling and setup ----------------------------------------------------------------

    async def _schedule(self) -> None:
        while True:
            try:
                waiting = await self._claims_waiting()
            except PodGone:
                raise
            except ApiError as err:  # the API is unreachable or refuses: ask again later
                waiting = f"cannot check volumes: {err}"
            if not waiting:
                break
            if waiting != self.unschedulable:
                self.unschedulable = waiting
                log.info("%s: waiting for volumes: %s", self.key, waiting)
                await self._publish()
            await asyncio.sleep(self.settings.poll_interval)
        self.unschedulable = ""
        node = self.settings.node_name
        while (self.pod.get("spec") or {}).get("nodeName") != node:
            try:
                await self._patch_pod(
                    [{"op": "add", "path": "/spec/nodeName", "value": node}], subresource=None
                )
                break
            except PodGone:
                raise
            except ApiError as err:
                log.warning("%s: cannot bind to node error=%s; retrying", self.key, err)
                await asyncio.sleep(self.settings.poll_interval)
        self.scheduled = True
        await self._publish()

    async def _claims_waiting(self) -> str:
        """Why the pod cannot be scheduled yet ('' when every PVC is bound)."""
        reasons = []
        for claim in claims_of(self.pod):
            try:
                pvc = await self.client.get(PERSISTENT_VOLUME_CLAIM, claim, self.namespace)
            except NotFound:
                reasons.append(f'persistentvolumeclaim "{claim}" not found')
                continue
            status = pvc.get("status") or {}
            if status.get("phase") == "Bound" and (pvc.get("spec") or {}).get("volumeName"):
                continue
            await self._select_node(pvc)
            reasons.append(f'persistentvolumeclaim "{claim}" is not bound')
        return "; ".join(reasons)

    async def _select_node(self, pvc: Obj) -> None:
        """Do kube-scheduler's part for a WaitForFirstConsumer PVC: name the node."""
        md = pvc["metadata"]
        if (md.get("annotations") or {}).get(SELECTED_NODE):
            return
        class_name = (pvc.get("spec") or {}).get("storageClassName")
        if not class_name:
            return
        try:
            sc = await self.client.get(STORAGE_CLASS, class_name)
        except NotFound:
            return
        if sc.get("volumeBindingMode") != WAIT_FOR_FIRST_CONSUMER:
            return
        await self.client.patch(
            PERSISTENT_VOLUME_CLAIM,
            md["name"],
            {"metadata": {"annotations": {SELECTED_NODE: self.settings.node_name}}},
            self.namespace,
        )
        log.info("%s: selected node for pvc=%s", self.key, md["name"])

    async def _setup(self) -> None:
        self.ip = self.agent.pool.take(self._preferred_ip)
        self.start_time = self.start_time or _now()
        await asyncio.to_thread(self._make_dirs)
        while True:
            try:
                self.volumes = await resolve_volumes(PodContext(self.client, self.pod), self.dir)
                return
            except (ConfigError, VolumeNotReady, ApiError) as err:
                message = str(err)
            for c in self.all_containers:
                if not c.done:
                    c.state = {"waiting": {"reason": "ContainerCreating", "message": message}}
            await self._publish()
            await asyncio.sleep(self.settings.poll_interval)

    def _make_dirs(self) -> None:
        for c in self.all_containers:
            logs.container_dir(self.agent.root, self.namespace, self.name, c.name).mkdir(
                parents=True, exist_ok=True
            )

    # --- containers ------------------------------------------------------------------------------

    def _stopped(self) -> bool:
        return self.stopping

    def _restarts(self, c: Container, code: int) -> bool:
        if self.policy == "Never":
            return False
        if c.init or self.policy == "OnFailure":
            return code != 0
        return True  # Always

    def _backoff(self, c: Container) -> float:
        delay = min(self.settings.backoff_base * 2.0**c.backoff_step, self.settings.backoff_max)
        if delay < self.settings.backoff_max:
            c.backoff_step += 1
        return delay

    async def _container_loop(self, c: Container) -> None:
        while not self.stopping:
            code = await self._run_once(c)
            if self._stopped():  # set while the container ran
                return
            if not self._restarts(c, code):
                c.done = True
                await self._publish()
                return
            delay = self._backoff(c)
            c.last_state = c.state
            c.state = {
                "waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": (
                        f"back-off {delay:g}s restarting failed container={c.name} "
                        f"pod={self.name}_{self.namespace}({self.uid})"
                    ),
                }
            }
            await self._publish()
            await asyncio.sleep(delay)

    async def _run_once(self, c: Container) -> int:
        """Start the container once and wait for it to end; returns its exit code."""
        root = self.agent.root
        workdir = logs.container_dir(root, self.namespace, self.name, c.name)
        term = logs.termination_log_path(root, self.namespace, self.name, c.name)
        log_file = logs.log_path(root, self.namespace, self.name, c.name)
        assert self.ip is not None
        while True:
            try:
                plan = await plan_container(
                    PodContext(self.client, self.pod),
                    c.spec,
                    self.volumes,
                    pod_ip=self.ip,
                    workdir=workdir,
                    termination_log=term,
                )
                break
            except (ConfigError, ApiError) as err:
                state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(err)}}
                if c.state != state:
                    log.warning("%s: container=%s cannot start: %s", self.key, c.name, err)
                    c.state = state
                    await self._publish()
                await asyncio.sleep(self.settings.poll_interval)
        await asyncio.to_thread(_fresh_files, log_file, term, rotate=c.started)
        if c.started:
            c.restart_count += 1
        c.started = True
        c.oom_killed = False
        started_at = _now()
        exe = find_executable(plan.argv[0], plan.env["PATH"])
        if exe is None:
            return await self._start_failed(
                c, started_at, f'exec: "{plan.argv[0]}": executable file not found in $PATH'
            )
        limits = Limits(
            address_space=(
                plan.memory_limit * self.settings.address_space_factor
                if plan.memory_limit and self.settings.address_space_factor
                else None
            ),
            file_size=plan.file_size_limit,
        )
        try:
            proc = await spawn([exe, *plan.argv[1:]], env=plan.env, cwd=plan.cwd, limits=limits)
        except OSError as err:
            return await self._start_failed(
                c, started_at, f"cannot run {plan.argv[0]}: {err.strerror or err}"
            )
        c.proc = proc
        c.container_id = f"cdi-local://{proc.pid}"
        c.state = {"running": {"startedAt": started_at}}
        log.info(
            "%s: started container=%s pid=%d ip=%s argv=%s memory_limit=%s file_size_limit=%s "
            "cpu_limit=%s",
            self.key,
            c.name,
            proc.pid,
            self.ip,
            plan.argv,
            plan.memory_limit,
            plan.file_size_limit,
            plan.cpu_limit,
        )
        if plan.cpu_limit and not self.agent.throttle.track(proc.pid, plan.cpu_limit):
            log.info(
                "%s: container=%s cpu_limit=%g is at least this machine's %d cores; not throttled",
                self.key,
                c.name,
                plan.cpu_limit,
                self.agent.throttle.cores,
            )
        if plan.memory_limit:
            limit = plan.memory_limit

            def exceeded(used: int) -> None:
                c.oom_killed = True
                log.warning(
                    "%s: container=%s over its memory limit used=%d limit=%d; killing",
                    self.key,
                    c.name,
                    used,
                    limit,
                )

            self.agent.watchdog.track(proc.pid, limit, exceeded)
        assert proc.stdout is not None
        copier = asyncio.create_task(_copy_output(proc.stdout, log_file))
        prober = self._readiness(c, plan.env, str(plan.cwd))
        await self._publish()
        began = time.monotonic()
        try:
            returncode = await proc.wait()
        finally:
            if prober is not None:
                prober.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await prober
            self.agent.watchdog.untrack(proc.pid)
            self.agent.throttle.untrack(proc.pid)  # continues it if stopped
            await kill(proc)
            c.proc = None
            try:
                await asyncio.wait_for(copier, timeout=DRAIN_SECONDS)
            except TimeoutError:
                log.warning("%s: container=%s output did not drain", self.key, c.name)
        seconds = time.monotonic() - began
        if seconds >= self.settings.backoff_reset:
            c.backoff_step = 0
        code = 128 - returncode if returncode < 0 else returncode
        reason = "OOMKilled" if c.oom_killed else "Completed" if code == 0 else "Error"
        policy = str(c.spec.get("terminationMessagePolicy") or "File")
        message = await asyncio.to_thread(_termination_message, term, log_file, policy, code)
        terminated: Obj = {
            "exitCode": code,
            "reason": reason,
            "startedAt": started_at,
            "finishedAt": _now(),
            "containerID": c.container_id,
        }
        if returncode < 0:
            terminated["signal"] = -returncode
        if message:
            terminated["message"] = message
        c.state = {"terminated": terminated}
        c.exit_code = code
        log.info(
            "%s: container=%s exited code=%d reason=%s seconds=%.1f restarts=%d",
            self.key,
            c.name,
            code,
            reason,
            seconds,
            c.restart_count,
        )
        if not self._stopped():  # when stopping, `stop` reports the end state once
            await self._publish()
        return code

    async def _start_failed(self, c: Container, started_at: str, message: str) -> int:
        log.warning("%s: container=%s failed to start: %s", self.key, c.name, message)
        c.container_id = ""
        c.exit_code = 128
        c.state = {
            "terminated": {
                "exitCode": 128,
                "reason": "StartError",
                "message": message,
                "startedAt": started_at,
                "finishedAt": _now(),
            }
        }
        await self._publish()
        return 128

    # --- status ----------------------------------------------------------------------------------

    def _phase(self) -> str:
        if self.init_failed:
            return PodPhase.FAILED.value
        if not self.initialized:
            return PodPhase.PENDING.value
        if all(c.done for c in self.containers):
            ok = all(c.exit_code == 0 for c in self.containers)
            return PodPhase.SUCCEEDED.value if ok else PodPhase.FAILED.value
        if any(c.started for c in self.containers):
            return PodPhase.RUNNING.value
        return PodPhase.PENDING.value

    def _condition(self, kind: str, ok: bool, reason: str = "", message: str = "") -> Obj:
        value = "True" if ok else "False"
        old = self._conditions.get(kind)
        if old is None or old["status"] != value:
            self._conditions[kind] = {"status": value, "lastTransitionTime": _now()}
        cond: Obj = {
            "type": kind,
            "status": value,
            "lastProbeTime": None,
            "lastTransitionTime": self._conditions[kind]["lastTransitionTime"],
        }
        if reason:
            cond["reason"] = reason
        if message:
            cond["message"] = message
        return cond

    def _status(self) -> Obj:
        phase = self._phase()
        terminal = phase in TERMINAL
        ready = bool(self.containers) and all(c.ready for c in self.containers)
        not_ready = "PodCompleted" if terminal else "ContainersNotReady"
        if self.scheduled:
            scheduled = self._condition("PodScheduled", True)
        else:
            scheduled = self._condition(
                "PodScheduled", False, "Unschedulable" if self.unschedulable else "", ""
            )
            if self.unschedulable:
                scheduled["message"] = self.unschedulable
        conditions = [
            scheduled,
            self._condition(
                "Initialized",
                self.initialized,
                "" if self.initialized else "ContainersNotInitialized",
            ),
            self._condition("ContainersReady", ready, "" if ready else not_ready),
            self._condition("Ready", ready, "" if ready else not_ready),
        ]
        status: Obj = {
            "phase": phase,
            "conditions": conditions,
            "hostIP": HOST_IP,
            "hostIPs": [{"ip": HOST_IP}],
            "containerStatuses": [c.status() for c in self.containers],
        }
        if self.init_containers:
            status["initContainerStatuses"] = [c.status() for c in self.init_containers]
        if self.ip:
            status["podIP"] = self.ip
            status["podIPs"] = [{"ip": self.ip}]
        if self.start_time:
            status["startTime"] = self.start_time
        return status

    def _readiness(
        self, c: Container, env: dict[str, str], cwd: str | None
    ) -> asyncio.Task[None] | None:
        """Start the container's readiness probe, if it has one (not ready until it passes)."""
        probe = c.spec.get("readinessProbe")
        if not probe or c.init:
            c.probed_ready = True
            return None
        c.probed_ready = False
        assert self.ip is not None

        async def changed(ready: bool) -> None:
            c.probed_ready = ready
            await self._publish()

        prober = ReadinessProber(
            probe,
            c.spec,
            pod_ip=self.ip,
            changed=changed,
            env=env,
            cwd=cwd,
            what=f"{self.key} container={c.name}",
        )
        return asyncio.create_task(prober.run(), name=f"probe {self.key}/{c.name}")

    async def _publish(self) -> None:
        """Write the whole status (JSON patch `add /status`, guarded by the pod's uid)."""
        if self.gone:
            return
        async with self._publish_lock:
            status = self._status()
            if status == self._published:
                return
            try:
                await self._patch_pod(
                    [{"op": "add", "path": "/status", "value": status}], subresource="status"
                )
            except PodGone:
                return
            except ApiError as err:
                # The next change writes the whole status again; nothing is lost for good.
                log.warning("%s: cannot write status error=%s", self.key, err)
                return
            self._published = status

    async def _patch_pod(self, ops: list[Obj], *, subresource: str | None) -> None:
        guard = {"op": "test", "path": "/metadata/uid", "value": self.uid}
        try:
            await self.client.patch(
                POD,
                self.name,
                [guard, *ops],
                self.namespace,
                patch_type="json",
                subresource=subresource,
            )
        except (NotFound, Invalid) as err:
            if isinstance(err, Invalid) and "test failed" not in str(err):
                raise
            self.gone = True
            raise PodGone(self.key) from err


# --- files ----------------------------------------------------------------------------------------


def _fresh_files(log_file: Path, term: Path, *, rotate: bool) -> None:
    """Before a start: the previous run's log becomes `.previous.log` (`kubectl logs -p`), and the
    termination log is an empty file, as the kubelet gives each container instance."""
    if rotate and log_file.exists():
        log_file.replace(log_file.with_name(log_file.name[: -len(".log")] + logs.PREVIOUS_SUFFIX))
    log_file.write_bytes(b"")
    term.parent.mkdir(parents=True, exist_ok=True)
    term.write_bytes(b"")


def _termination_message(term: Path, log_file: Path, policy: str, code: int) -> str:
    try:
        with term.open("rb") as f:
            message = f.read(MAX_MESSAGE_BYTES).decode(errors="replace")
    except FileNotFoundError:
        message = ""
    if not message and code != 0 and policy == "FallbackToLogsOnError":
        try:
            message = logs.tail(log_file.read_bytes().decode(errors="replace"))
        except FileNotFoundError:
            message = ""
    return message


async def _copy_output(stream: asyncio.StreamReader, path: Path) -> None:
    with path.open("ab") as out:
        while chunk := await stream.read(CHUNK):
            out.write(chunk)
            out.flush()  # so `kubectl logs` sees output as it comes


# --- the agent ------------------------------------------------------------------------------------


class Agent:
    """All pods of this node: one informer, one runner per pod (by uid), one memory watchdog,
    one CPU throttle."""

    def __init__(self, client: Client, root: Path, settings: AgentSettings) -> None:
        self.client = client
        self.root = root.resolve()
        self.settings = settings
        self.pool = AddressPool()
        self.watchdog = MemoryWatchdog(settings.memory_poll)
        self.throttle = CpuThrottle(settings.cpu_period)
        self.runners: dict[str, PodRunner] = {}
        self._background: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        pods = logs.pods_dir(self.root)
        pods.mkdir(parents=True, exist_ok=True)
        # A previous agent over this root that was killed (SIGKILL, OOM) took its containers
        # with it (PR_SET_PDEATHSIG), but not their children: they must be gone before the pods
        # are adopted and their containers started again over the same volumes.
        await kill_leftovers(worker_env.CDI_TERMINATION_LOG, pods)
        log.info("agent started node=%s root=%s", self.settings.node_name, self.root)
        tasks = [
            asyncio.create_task(self._watch(), name="pod-informer"),
            asyncio.create_task(self.watchdog.run(), name="memory-watchdog"),
            asyncio.create_task(self.throttle.run(), name="cpu-throttle"),
        ]
        stopping = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopping:
                    task.result()  # a loop that ended by itself crashed: say so
        finally:
            for task in (stopping, *tasks):
                task.cancel()
            await asyncio.gather(stopping, *tasks, return_exceptions=True)
            await self._shutdown()

    async def _shutdown(self) -> None:
        runners = list(self.runners.values())
        self.runners.clear()
        await asyncio.gather(
            *(r.stop(self.settings.shutdown_grace, publish=False) for r in runners),
            return_exceptions=True,
        )
        await asyncio.gather(*self._background, return_exceptions=True)
        log.info("agent stopped pods=%d", len(runners))

    def _spawn(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        task = asyncio.create_task(coro, name=what)
        self._background.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("%s failed", what, exc_info=t.exception())

        task.add_done_callback(done)

    async def _watch(self) -> None:
        async for change in list_then_watch(self.client, POD):
            try:
                if isinstance(change, Snapshot):
                    self._resync(change.items)
                elif change.type == "DELETED":
                    self._forget(change.object)
                else:
                    self._observe(change.object)
            except Exception:  # one odd pod must not stop the node
                log.exception("cannot handle pod change")

    def _resync(self, pods: list[Obj]) -> None:
        present = {p["metadata"].get("uid") for p in pods}
        for uid, runner in list(self.runners.items()):
            if uid not in present:
                self._forget(runner.pod)
        # Pods that had an address (an earlier agent ran them) claim it back before new pods
        # are given one.
        for pod in sorted(pods, key=lambda p: not (p.get("status") or {}).get("podIP")):
            try:
                self._observe(pod)
            except Exception:  # one odd pod must not keep the others from running
                log.exception("%s: cannot handle pod", _key(pod))

    def _observe(self, pod: Obj) -> None:
        md = pod["metadata"]
        spec = pod.get("spec") or {}
        node = spec.get("nodeName")
        if node and node != self.settings.node_name:
            return
        uid = str(md.get("uid"))
        runner = self.runners.get(uid)
        if runner is not None:
            runner.pod = pod  # newest labels and annotations, and the deletion mark
            if md.get("deletionTimestamp") and not runner.deleting:
                runner.deleting = True
                self._spawn(self._delete(runner), f"delete pod {runner.key}")
            return
        if md.get("deletionTimestamp"):
            if node == self.settings.node_name:
                self._spawn(self._finish_deletion(pod), f"delete pod {_key(pod)}")
            return
        if (pod.get("status") or {}).get("phase") in TERMINAL:
            return
        runner = PodRunner(self, pod)
        self.runners[uid] = runner
        log.info("%s: pod accepted uid=%s", runner.key, uid)
        runner.start()

    def _forget(self, pod: Obj) -> None:
        runner = self.runners.pop(str(pod["metadata"].get("uid")), None)
        if runner is not None:
            self._spawn(self._remove(runner), f"remove pod {runner.key}")

    async def _remove(self, runner: PodRunner) -> None:
        """The pod object is gone: stop its processes and remove its files."""
        await runner.stop(runner.grace(), publish=False)
        runner.release_address()
        same_name = any(
            r.namespace == runner.namespace and r.name == runner.name for r in self.runners.values()
        )
        if not same_name:
            await asyncio.to_thread(shutil.rmtree, runner.dir, ignore_errors=True)
        log.info("%s: pod removed", runner.key)

    async def _delete(self, runner: PodRunner) -> None:
        """The pod is marked for deletion: stop it gracefully, report, then finish the delete."""
        await runner.stop(runner.grace(), publish=True)
        await self._finish_deletion(runner.pod)

    async def _finish_deletion(self, pod: Obj) -> None:
        md = pod["metadata"]
        body = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": md.get("uid")},
        }
        with contextlib.suppress(NotFound, Conflict):
            await self.client.request(
                "DELETE", resource_path(POD, md.get("namespace"), md.get("name")), body=body
            )


async def run_agent(
    client: Client,
    *,
    root: Path,
    stop: asyncio.Event,
    node_name: str = DEFAULT_NODE,
    settings: AgentSettings | None = None,
) -> None:
    """Run this machine's pods until `stop` is set; then kill and reap every process started.
    `root` is the server's data dir (pod files go to `<root>/pods`). `settings` (tests shorten
    the back-off) wins over `node_name` when both are given."""
    chosen = settings if settings is not None else AgentSettings(node_name=node_name)
    await Agent(client, root, chosen).run(stop)
