"""cdi.agent: the local node agent of the all-in-one server (Pod objects run as local processes).

`run_agent` is started by `cdi server`; `read_log` serves the embedded API's `pods/log` route
(`kubectl logs`). On a real cluster none of this runs: the kubelet runs the same pod specs.
"""

from cdi.agent.logs import ContainerRequired, LogNotFound, read_log
from cdi.agent.runner import AgentSettings, run_agent

__all__ = ["AgentSettings", "ContainerRequired", "LogNotFound", "read_log", "run_agent"]
