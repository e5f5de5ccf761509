"""Pure parts of the upload proxy: the Authorization header, claims, escaping, names, paths."""

from __future__ import annotations

from typing import Any

import pytest

from cdi.api import jwt
from cdi.controller import naming as controller_naming
from uploadproxy import naming
from uploadproxy.auth import UploadClaim, bearer_token, upload_claim
from uploadproxy.errors import Rejection, go_html_escape
from uploadproxy.target import UPLOAD_PATHS, upload_path

TOKEN = "eyJhbGciOiJQUzI1NiJ9.eyJpc3MiOiJ4In0.c2ln-_~+/"


@pytest.mark.parametrize(
    "header",
    [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"BEARER\t{TOKEN}", f"Bearer    {TOKEN}"],
)
def test_bearer_headers_cdi_accepts(header: str) -> None:
    assert bearer_token(header) == TOKEN


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        TOKEN,
        f"Bearer {TOKEN} ",
        f" Bearer {TOKEN}",
        f"Bearer {TOKEN}\n",
        "Bearer a=b",
        "Bearer a,b",
        "Bearer é",
        "Bearer\u00a0abc",
    ],
)
def test_bearer_headers_cdi_refuses(header: str | None) -> None:
    with pytest.raises(Rejection) as caught:
        bearer_token(header)
    assert (caught.value.status, caught.value.text) == (400, "")


def test_upload_claims() -> None:
    claims = jwt.upload_token_claims("disk", "ns", now=0)
    assert upload_claim(claims) == UploadClaim("disk", "ns")
    # CDI looks at the resource name only, not its group or version.
    claims["resource"] = {"resource": "persistentvolumeclaims"}
    assert upload_claim(claims) == UploadClaim("disk", "ns")


@pytest.mark.parametrize(
    "change",
    [
        {"operation": "Clone"},
        {"operation": None},
        {"name": 5},
        {"namespace": None},
        {"resource": None},
        {"resource": {"resource": "volumesnapshots"}},
    ],
)
def test_claims_that_are_not_an_upload(change: dict[str, Any]) -> None:
    claims = jwt.upload_token_claims("disk", "ns", now=0)
    claims.update(change)
    with pytest.raises(Rejection) as caught:
        upload_claim(claims)
    assert caught.value.status == 400


def test_html_escaping_is_gos() -> None:
    assert go_html_escape('<a href="x">O\'Neil & co</a>') == (
        "&lt;a href=&#34;x&#34;&gt;O&#39;Neil &amp; co&lt;/a&gt;"
    )


@pytest.mark.parametrize(
    "pvc",
    ["disk", "my.disk.v2", "a" * 52, "a" * 53, "b" * 100, "c" * 243, "d" * 250, "x.y" * 80],
)
def test_upload_names_agree_with_the_controller(pvc: str) -> None:
    pod = naming.upload_pod_name(pvc)
    assert pod == controller_naming.upload_pod_name(pvc)
    assert naming.service_name(pod) == controller_naming.upload_service_name(pvc)
    assert len(naming.service_name(pod)) <= 63


def _pvc(content_type: str | None) -> dict[str, Any]:
    annotations = (
        {} if content_type is None else {"cdi.kubevirt.io/storage.contentType": content_type}
    )
    return {"metadata": {"name": "x", "namespace": "ns", "annotations": annotations}}


def test_upload_paths() -> None:
    claim = UploadClaim("x", "ns")
    assert len(UPLOAD_PATHS) == 8
    for path in UPLOAD_PATHS:
        assert upload_path(_pvc(None), claim, path) == path
        assert upload_path(_pvc("kubevirt"), claim, path) == path
        archive = upload_path(_pvc("archive"), claim, path)
        version = "v1alpha1" if "alpha" in path else "v1beta1"
        assert archive == f"/{version}/upload-archive"
    with pytest.raises(Rejection) as caught:
        upload_path(_pvc("Archive"), claim, "/v1beta1/upload")
    assert caught.value.status == 503
