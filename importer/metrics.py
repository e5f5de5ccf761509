"""Import progress as Prometheus metrics, served over HTTPS as CDI's importer does (reference §3.3).

`kubevirt_cdi_import_progress_total{ownerUID}` is a counter of percent (0-100) that only grows,
because CDI's controller scrapes it with that regex. We add the bytes read from the source. The
certificate is a throw-away self-signed one, as in CDI; the scraper does not verify it.
"""

from __future__ import annotations

import logging
import threading

from prometheus_client import CollectorRegistry, Counter

log = logging.getLogger(__name__)


class ImportProgress:
    """Progress of one import: percent for the controller, bytes for people and benchmarks."""

    def __init__(self, owner_uid: str, *, metric: str = "kubevirt_cdi_import_progress") -> None:
        self.registry = CollectorRegistry()
        self._lock = threading.Lock()
        self._percent = 0.0
        self._bytes = 0
        self._progress = Counter(
            metric, "Import progress in percent", ["ownerUID"], registry=self.registry
        ).labels(ownerUID=owner_uid)
        self._transferred = Counter(
            "cdi_import_transferred_bytes",
            "Bytes read from the source",
            ["ownerUID"],
            registry=self.registry,
        ).labels(ownerUID=owner_uid)

    @property
    def percent(self) -> float:
        return self._percent

    @property
    def transferred(self) -> int:
        return self._bytes

    def set_percent(self, percent: float) -> None:
        """Raise progress to `percent`; lower values are ignored so the counter never falls."""
        percent = min(100.0, percent)
        with self._lock:
            if percent > self._percent:
                self._progress.inc(percent - self._percent)
                self._percent = percent

    def add_bytes(self, count: int) -> None:
        with self._lock:
            self._bytes += count
            self._transferred.inc(count)
