"""Clone progress as a Prometheus metric, served over HTTPS as CDI's cloner does (reference §7.3).

`kubevirt_cdi_clone_progress_total{ownerUID}` is a counter of percent (0-100) of the source's
data sent; it only grows. It is served by cdi.image.metricsserver, as the importer's is.
"""

from __future__ import annotations

import logging
import threading
from typing import Final

from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger(__name__)

METRIC: Final = "kubevirt_cdi_clone_progress"  # the client library adds "_total"


class CloneProgress:
    """Percent for the controller; set from the reading thread, read by the metrics thread."""

    def __init__(self, owner_uid: str) -> None:
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._percent = 0.0
        self._counter = Counter(
            METRIC, "Clone progress in percent", ["ownerUID"], registry=self.registry
        ).labels(ownerUID=owner_uid)

    @property
    def percent(self) -> float:
        return self._percent

    def set_percent(self, percent: float) -> None:
        """Raise progress to `percent` (at most 100); lower values are ignored."""
        percent = min(100.0, percent)
        with self._lock:
            if percent > self._percent:
                self._counter.inc(percent - self._percent)
                self._percent = percent
