"""The upload proxy's one error: a request it refuses, with the status and body CDI gives.

    Rejection(status, text)
      400  no or malformed Authorization header, token claims not an upload (empty body)
      401  token signature, issuer or times invalid (body: why)
      502  the upload server could not be reached or failed mid-request
      503  PVC missing, not an upload target, finished, not ready in time, content type
           invalid; the signing key or the TLS material cannot be read; no pod IP yet

Raised anywhere in the package and translated once, in `uploadproxy.app`, into the response.
"""

from __future__ import annotations


class Rejection(Exception):
    """Answer the request with `status` and the one-line `text` (already safe to send)."""

    def __init__(self, status: int, text: str = "") -> None:
        super().__init__(text or str(status))
        self.status = status
        self.text = text


def go_html_escape(text: str) -> str:
    """Go's `html.EscapeString`: the five characters it replaces, spelled as Go spells them
    (CDI escapes the PVC-derived texts of its 503 answers this way, against XSS)."""
    return (
        text.replace("&", "&amp;")
        .replace("'", "&#39;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&#34;")
    )
