"""Upload failures as CDI's upload server answers them (reference §6.6): status and body.

no capacity (the image does not fit, ENOSPC, EDQUOT)   400 "Saving stream failed: effective
                                                       image size is larger than the reported
                                                       available storage: ..."
bad or unsafe data, a broken or refused body           400 "Saving stream failed: ..."
anything else                                          500 "Saving stream failed: ..."
"""

from __future__ import annotations

import errno

from cdi.image.errors import ImageTooLargeError
from importer.errors import FatalProcessingError, ImporterError
from importer.sources.upload import UploadBodyError

NO_CAPACITY = "effective image size is larger than the reported available storage"
_NO_SPACE_TEXT = ("no space left on device", "disk quota exceeded", "a larger pvc is required")


def classify(err: BaseException) -> tuple[int, str]:
    """An upload failure as CDI's status and body."""
    if no_capacity(err):
        return 400, f"Saving stream failed: {NO_CAPACITY}: {describe(err)}"
    if isinstance(err, UploadBodyError | FatalProcessingError):
        return 400, f"Saving stream failed: {describe(err)}"
    return 500, f"Saving stream failed: {describe(err)}"


def describe(err: BaseException) -> str:
    if isinstance(err, ImporterError):
        return str(err)
    return f"{type(err).__name__}: {err}"


def no_capacity(err: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ImageTooLargeError):
            return True
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(current).lower()
        if any(t in text for t in _NO_SPACE_TEXT):
            return True
        current = current.__cause__ or current.__context__
    return False
