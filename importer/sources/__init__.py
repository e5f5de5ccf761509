"""Import sources: one protocol (`base.Source`), one module per kind, chosen by `open_source`."""

from __future__ import annotations

from cdi.api import SourceType
from importer.settings import ImporterSettings
from importer.sources.base import Source, SourceInfo
from importer.sources.http import HttpSource
from importer.sources.s3 import S3Source

__all__ = ["HttpSource", "S3Source", "Source", "SourceInfo", "open_source"]


def open_source(settings: ImporterSettings) -> Source:
    if settings.source is SourceType.HTTP:
        return HttpSource(settings)
    if settings.source is SourceType.S3:
        return S3Source(settings)
    raise ValueError(f"no streaming source for {settings.source}")
