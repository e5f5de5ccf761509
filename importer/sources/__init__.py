"""Import sources: one protocol (`base.Source`), one module per kind, chosen by `open_source`."""

from __future__ import annotations

from cdi.api import SourceType
from importer.settings import ImporterSettings
from importer.sources.base import Source, SourceInfo

__all__ = ["Source", "SourceInfo", "open_source"]


def open_source(settings: ImporterSettings) -> Source:
    # Imported on demand: boto3 alone costs 0.2 s and 20 MB that an HTTP import never needs.
    if settings.source is SourceType.HTTP:
        from importer.sources.http import HttpSource  # noqa: PLC0415

        return HttpSource(settings)
    if settings.source is SourceType.S3:
        from importer.sources.s3 import S3Source  # noqa: PLC0415

        return S3Source(settings)
    raise ValueError(f"no streaming source for {settings.source}")
