"""The upload proxy's request handling, row by row of reference §6.5, against the embedded API
server and a mutual-TLS upload server stand-in (see conftest.py)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import logging
import os
import time

import aiohttp
import pytest

from cdi.api import annotations as ann
from cdi.api import jwt
from cdi.api.groups import NAMESPACE, PERSISTENT_VOLUME_CLAIM, SECRET
from cdi.api.tokens import SIGNING_KEY_SECRET
from tests.uploadproxy.conftest import CDI_NAMESPACE, ProxyEnv, put_tls_material
from tests.uploadproxy.helpers import Pki, Sink
from uploadproxy.settings import ResolveMode
from uploadproxy.target import UPLOAD_PATHS, Endpoint, upstream_endpoint

MIB = 1 << 20


# --- authentication -----------------------------------------------------------------------


async def test_healthz_needs_no_token(proxy_env: ProxyEnv) -> None:
    for method in ("GET", "HEAD"):
        reply = await proxy_env.send("/healthz", method=method)
        assert reply.status == 200
    assert (await proxy_env.send("/healthz", method="GET")).text == "OK"


async def test_no_authorization_is_400_with_an_empty_body(proxy_env: ProxyEnv) -> None:
    await proxy_env.pvc("x")
    reply = await proxy_env.send("/v1beta1/upload", data=b"data")
    assert (reply.status, reply.text) == (400, "")
    assert proxy_env.sink.requests == []


@pytest.mark.parametrize(
    "header",
    [
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer ",
        "Bearertoken",
        "Bearer two words",
        "Bearer tok$en",
        "Bearer tok=en",
        "Token abc",
    ],
)
async def test_malformed_authorization_is_400(proxy_env: ProxyEnv, header: str) -> None:
    reply = await proxy_env.send("/v1beta1/upload", data=b"x", headers={"Authorization": header})
    assert (reply.status, reply.text) == (400, "")


async def test_bearer_is_case_insensitive(proxy_env: ProxyEnv) -> None:
    await proxy_env.pvc("x")
    token = proxy_env.token("x")
    reply = await proxy_env.send(
        "/v1beta1/upload", data=b"x", headers={"Authorization": f"bEARER \t {token}"}
    )
    assert reply.status == 200


async def test_wrong_signature_is_401_with_the_reason(proxy_env: ProxyEnv) -> None:
    await proxy_env.pvc("x")
    other_key = jwt.generate_signing_key()
    reply = await proxy_env.send(
        "/v1beta1/upload", token=proxy_env.token("x", key=other_key), data=b"x"
    )
    assert reply.status == 401
    assert "signature" in reply.text
    # A token that is not a JWT at all is also the token's fault: 401.
    reply = await proxy_env.send("/v1beta1/upload", token="not.a.jwt", data=b"x")
    assert reply.status == 401
    assert proxy_env.sink.requests == []


async def test_expired_token_is_401_but_the_leeway_is_honoured(proxy_env: ProxyEnv) -> None:
    await proxy_env.pvc("x")
    lifetime = 300
    long_ago = time.time() - lifetime - 60
    reply = await proxy_env.send(
        "/v1beta1/upload", token=proxy_env.token("x", now=long_ago), data=b"x"
    )
    assert reply.status == 401
    assert "expired" in reply.text
    # Expired 5 s ago: within CDI's 10 s leeway.
    just_expired = time.time() - lifetime - 5
    reply = await proxy_env.send(
        "/v1beta1/upload", token=proxy_env.token("x", now=just_expired), data=b"x"
    )
    assert reply.status == 200
    # Issued 60 s in the future (nbf): not yet valid.
    reply = await proxy_env.send(
        "/v1beta1/upload", token=proxy_env.token("x", now=time.time() + 60), data=b"x"
    )
    assert reply.status == 401


async def test_wrong_issuer_is_401(proxy_env: ProxyEnv) -> None:
    await proxy_env.pvc("x")
    token = proxy_env.token("x", iss="cdi-deployment")
    reply = await proxy_env.send("/v1beta1/upload", token=token, data=b"x")
    assert reply.status == 401
    assert "issuer" in reply.text


@pytest.mark.parametrize(
    "claims",
    [
        {"operation": "Clone"},
        {
            "resource": {
                "group": "snapshot.storage.k8s.io",
                "version": "v1",
                "resource": "volumesnapshots",
            }
        },
        {"resource": "persistentvolumeclaims"},
        {"name": ""},
        {"namespace": ""},
        {"name": None},
    ],
)
async def test_claims_that_are_not_an_upload_are_400(
    proxy_env: ProxyEnv, claims: dict[str, object]
) -> None:
    await proxy_env.pvc("x")
    reply = await proxy_env.send("/v1beta1/upload", token=proxy_env.token("x", **claims), data=b"x")
    assert (reply.status, reply.text) == (400, "")
    assert proxy_env.sink.requests == []


async def test_a_recreated_signing_key_is_picked_up(proxy_env: ProxyEnv) -> None:
    await proxy_env.pvc("x")
    assert (await proxy_env.send("/v1beta1/upload", token=proxy_env.token("x"))).status == 200
    new_key = jwt.generate_signing_key()
    secret = await proxy_env.client.get(SECRET, SIGNING_KEY_SECRET, CDI_NAMESPACE)
    secret["data"] = {
        "id_rsa": base64.b64encode(new_key).decode(),
        "id_rsa.pub": base64.b64encode(jwt.public_key_pem(new_key)).decode(),
    }
    await proxy_env.client.replace(SECRET, secret)
    reply = await proxy_env.send("/v1beta1/upload", token=proxy_env.token("x", key=new_key))
    assert reply.status == 200
    # ... and the old key no longer opens anything.
    reply = await proxy_env.send("/v1beta1/upload", token=proxy_env.token("x"))
    assert reply.status == 401


async def test_a_configured_public_key_is_used_instead_of_the_secret(proxy_env: ProxyEnv) -> None:
    await proxy_env.pvc("x")
    own_key = jwt.generate_signing_key()
    base = await proxy_env.start_proxy(public_key=jwt.public_key_pem(own_key))
    ok = await proxy_env.send("/v1beta1/upload", token=proxy_env.token("x", key=own_key), base=base)
    assert ok.status == 200
    other = await proxy_env.send("/v1beta1/upload", token=proxy_env.token("x"), base=base)
    assert other.status == 401


async def test_tokens_are_never_logged(
    proxy_env: ProxyEnv, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await proxy_env.pvc("x")
    token = proxy_env.token("x")
    await proxy_env.send("/v1beta1/upload", token=token, data=b"abc")
    await proxy_env.send("/v1beta1/upload", token=token + "x", data=b"abc")
    await proxy_env.send("/v1beta1/upload", token=proxy_env.token("x", operation="Clone"))
    lines = [r.getMessage() for r in caplog.records]
    assert not [line for line in lines if token[:40] in line or token[-40:] in line]
    mine = [r.getMessage() for r in caplog.records if r.name == "uploadproxy.upstream"]
    assert any("pvc=default/x status=200 sent=3" in line for line in mine), mine


# --- the PVC --------------------------------------------------------------------------------


async def test_missing_pvc_is_503_after_the_wait(proxy_env: ProxyEnv) -> None:
    started = time.monotonic()
    reply = await proxy_env.send("/v1beta1/upload", token=proxy_env.token("nope"), data=b"x")
    elapsed = time.monotonic() - started
    assert reply.status == 503
    assert reply.text == "rejecting Upload Request for PVC nope that doesn&#39;t exist"
    assert elapsed >= proxy_env.settings.ready_wait


async def test_pvc_created_during_the_wait_is_served(proxy_env: ProxyEnv) -> None:
    async def create_later() -> None:
        await asyncio.sleep(0.3)
        await proxy_env.pvc("late")

    task = asyncio.create_task(create_later())
    reply = await proxy_env.send("/v1beta1/upload", token=proxy_env.token("late"), data=b"x")
    await task
    assert reply.status == 200


async def test_pvc_that_is_not_an_upload_target_is_503(proxy_env: ProxyEnv) -> None:
    await proxy_env.pvc("plain", target=False)
    reply = await proxy_env.send("/v1beta1/upload", token=proxy_env.token("plain"), data=b"x")
    assert (reply.status, reply.text) == (503, "PVC plain is not an upload target")


async def test_pvc_that_finished_uploading_is_503_at_once(proxy_env: ProxyEnv) -> None:
    await proxy_env.pvc("done", annotations={ann.POD_PHASE: "Succeeded"})
    started = time.monotonic()
    reply = await proxy_env.send("/v1beta1/upload", token=proxy_env.token("done"), data=b"x")
    assert reply.status == 503
    assert reply.text == "rejecting Upload Request for PVC done that already finished uploading"
    assert time.monotonic() - started < proxy_env.settings.ready_wait


async def test_upload_server_becoming_ready_within_the_wait_is_forwarded(
    proxy_env: ProxyEnv,
) -> None:
    await proxy_env.pvc("slow", ready=False, annotations={ann.POD_PHASE: "Pending"})

    async def ready_later() -> None:
        await asyncio.sleep(0.4)
        await proxy_env.annotate("slow", "default", {ann.POD_READY: "true"})

    task = asyncio.create_task(ready_later())
    started = time.monotonic()
    reply = await proxy_env.send("/v1beta1/upload", token=proxy_env.token("slow"), data=b"data")
    await task
    assert reply.status == 200
    assert time.monotonic() - started >= 0.4
    assert [r.size for r in proxy_env.sink.requests] == [4]


async def test_upload_server_never_ready_is_503_with_a_timeout(proxy_env: ProxyEnv) -> None:
    await proxy_env.pvc("stuck", ready=False)
    reply = await proxy_env.send("/v1beta1/upload", token=proxy_env.token("stuck"), data=b"x")
    assert reply.status == 503
    assert "timed out" in reply.text
    assert "stuck" in reply.text
    assert proxy_env.sink.requests == []


@pytest.mark.parametrize("value", ["1", "t", "TRUE", "True"])
async def test_ready_is_read_as_go_parses_booleans(proxy_env: ProxyEnv, value: str) -> None:
    await proxy_env.pvc("x", annotations={ann.POD_READY: value})
    assert (await proxy_env.send("/v1beta1/upload", token=proxy_env.token("x"))).status == 200


async def test_token_reaches_only_the_pvc_in_its_own_namespace(proxy_env: ProxyEnv) -> None:
    # PVC "a" is ready in n2; the token is for n1/a, which does not exist.
    await proxy_env.pvc("a", "n2")
    reply = await proxy_env.send("/v1beta1/upload", token=proxy_env.token("a", "n1"), data=b"x")
    assert reply.status == 503
    assert "doesn&#39;t exist" in reply.text
    assert proxy_env.sink.requests == []
    # With n1/a there too, the n1 token goes to n1's upload server (its Service name).
    await proxy_env.pvc("a", "n1")
    reply = await proxy_env.send("/v1beta1/upload", token=proxy_env.token("a", "n1"), data=b"x")
    assert reply.status == 200
    assert proxy_env.sink.requests[-1].headers["Host"] == "cdi-upload-a.n1.svc:" + str(
        proxy_env.sink.port
    )


async def test_upload_pod_name_comes_from_the_pvc_annotation(proxy_env: ProxyEnv) -> None:
    await proxy_env.pvc("x", pod=False, annotations={ann.UPLOAD_POD_NAME: "custom-pod"})
    await proxy_env.upload_pod("custom-pod", "default")
    reply = await proxy_env.send("/v1beta1/upload", token=proxy_env.token("x"), data=b"x")
    assert reply.status == 200
    assert proxy_env.sink.requests[0].headers["Host"].startswith("custom-pod.default.svc:")


async def test_upload_pod_without_an_ip_is_503(proxy_env: ProxyEnv) -> None:
    await proxy_env.pvc("x", pod=False)
    reply = await proxy_env.send("/v1beta1/upload", token=proxy_env.token("x"), data=b"x")
    assert reply.status == 503
    assert reply.text == "error in upload-proxy: upload pod cdi-upload-x not found"
    await proxy_env.upload_pod("cdi-upload-x", "default", ip=None)
    reply = await proxy_env.send("/v1beta1/upload", token=proxy_env.token("x"), data=b"x")
    assert reply.status == 503
    assert "has no IP" in reply.text


async def test_upload_populator_pvc_goes_to_its_pvc_prime(proxy_env: ProxyEnv) -> None:
    source_ref = {
        "dataSourceRef": {
            "apiGroup": "cdi.kubevirt.io",
            "kind": "VolumeUploadSource",
            "name": "upload-source",
        }
    }
    await proxy_env.pvc("target", pod=False, target=False, ready=False, spec=source_ref)
    token = proxy_env.token("target")

    async def populate() -> None:
        await asyncio.sleep(0.2)
        await proxy_env.pvc("prime-1234")
        await proxy_env.annotate("target", "default", {ann.PVC_PRIME: "prime-1234"})

    task = asyncio.create_task(populate())
    reply = await proxy_env.send("/v1beta1/upload", token=token, data=b"abc")
    await task
    assert reply.status == 200
    assert proxy_env.sink.requests[0].headers["Host"].startswith("cdi-upload-prime-1234.default.")

    await proxy_env.pvc("orphan", pod=False, spec=source_ref, annotations={ann.PVC_PRIME: "gone"})
    reply = await proxy_env.send("/v1beta1/upload", token=proxy_env.token("orphan"), data=b"x")
    assert (reply.status, reply.text) == (
        503,
        "rejecting Upload Request for PVC orphan, PVC&#39; wasn&#39;t created yet",
    )


# --- content type and paths -----------------------------------------------------------------


@pytest.mark.parametrize("path", UPLOAD_PATHS)
@pytest.mark.parametrize("content_type", ["", "kubevirt"])
async def test_every_path_is_forwarded_unchanged(
    proxy_env: ProxyEnv, path: str, content_type: str
) -> None:
    annotations = {ann.CONTENT_TYPE: content_type} if content_type else {}
    await proxy_env.pvc("x", annotations=annotations)
    reply = await proxy_env.send(path, token=proxy_env.token("x"), data=b"12345")
    assert reply.status == 200
    assert [(r.method, r.path, r.size) for r in proxy_env.sink.requests] == [("POST", path, 5)]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1beta1/upload", "/v1beta1/upload-archive"),
        ("/v1beta1/upload-async", "/v1beta1/upload-archive"),
        ("/v1beta1/upload-form", "/v1beta1/upload-archive"),
        ("/v1alpha1/upload", "/v1alpha1/upload-archive"),
        ("/v1alpha1/upload-async", "/v1alpha1/upload-archive"),
    ],
)
async def test_archive_pvc_paths_are_rewritten(
    proxy_env: ProxyEnv, path: str, expected: str
) -> None:
    await proxy_env.pvc("arch", annotations={ann.CONTENT_TYPE: "archive"})
    reply = await proxy_env.send(path, token=proxy_env.token("arch"), data=b"tar")
    assert reply.status == 200
    assert proxy_env.sink.requests[0].path == expected


async def test_invalid_content_type_is_503_escaped(proxy_env: ProxyEnv) -> None:
    await proxy_env.pvc("x", annotations={ann.CONTENT_TYPE: "<b>iso</b>"})
    reply = await proxy_env.send("/v1beta1/upload", token=proxy_env.token("x"), data=b"x")
    assert reply.status == 503
    assert reply.text == (
        "rejecting upload request for PVC x - upload content-type &lt;b&gt;iso&lt;/b&gt; is invalid"
    )
    assert proxy_env.sink.requests == []


async def test_upload_archive_and_unknown_paths_are_not_served(proxy_env: ProxyEnv) -> None:
    await proxy_env.pvc("x")
    for path in ("/v1beta1/upload-archive", "/v1beta1/uploadx", "/"):
        assert (await proxy_env.send(path, token=proxy_env.token("x"))).status == 404


# --- forwarding -----------------------------------------------------------------------------


async def test_head_is_forwarded_with_the_offset_header(proxy_env: ProxyEnv) -> None:
    await proxy_env.pvc("x")
    proxy_env.sink.answer("/v1beta1/upload", headers={"Upload-Offset": "1048576"})
    reply = await proxy_env.send("/v1beta1/upload", method="HEAD", token=proxy_env.token("x"))
    assert reply.status == 200
    assert reply.headers["Upload-Offset"] == "1048576"
    assert reply.text == ""
    assert [(r.method, r.path) for r in proxy_env.sink.requests] == [("HEAD", "/v1beta1/upload")]


async def test_put_with_content_range_is_forwarded_with_its_headers(proxy_env: ProxyEnv) -> None:
    await proxy_env.pvc("x")
    proxy_env.sink.answer(
        "/v1beta1/upload-async", status=201, body=b"chunk stored", headers={"Upload-Offset": "8"}
    )
    token = proxy_env.token("x")
    reply = await proxy_env.send(
        "/v1beta1/upload-async?resume=1&x=a%26b%20c",
        method="PUT",
        token=token,
        data=b"01234567",
        headers={
            "Content-Range": "bytes 0-7/16",
            "Content-Type": "application/octet-stream",
            "x-cdi-content-type": "filesystem-clone",
            "X-Other": "dropped",
        },
    )
    assert (reply.status, reply.text, reply.headers["Upload-Offset"]) == (201, "chunk stored", "8")
    (seen,) = proxy_env.sink.requests
    assert (seen.method, seen.path, seen.query) == (
        "PUT",
        "/v1beta1/upload-async",
        "resume=1&x=a%26b%20c",
    )
    assert seen.headers["Content-Range"] == "bytes 0-7/16"
    assert seen.headers["Content-Length"] == "8"
    assert seen.headers["Content-Type"] == "application/octet-stream"
    assert seen.headers["x-cdi-content-type"] == "filesystem-clone"
    assert "Authorization" not in seen.headers
    assert "X-Other" not in seen.headers
    assert "Transfer-Encoding" not in seen.headers
    assert seen.client_cn == "client.upload-server.cdi.kubevirt.io"
    assert seen.size == 8


async def test_form_upload_is_streamed_unchanged(proxy_env: ProxyEnv) -> None:
    await proxy_env.pvc("x")
    boundary = "cdi-test-boundary-1234"
    raw = b"".join(
        [
            f"--{boundary}\r\n".encode(),
            b'Content-Disposition: form-data; name="file"; filename="disk.img"\r\n',
            b"Content-Type: application/octet-stream\r\n\r\n",
            os.urandom(3 * MIB + 17),
            f"\r\n--{boundary}--\r\n".encode(),
        ]
    )
    content_type = f"multipart/form-data; boundary={boundary}"
    reply = await proxy_env.send(
        "/v1beta1/upload-form-async",
        token=proxy_env.token("x"),
        data=io.BytesIO(raw),
        headers={"Content-Type": content_type, "Content-Length": str(len(raw))},
    )
    assert reply.status == 200
    (seen,) = proxy_env.sink.requests
    assert seen.path == "/v1beta1/upload-form-async"
    assert seen.headers["Content-Type"] == content_type
    assert seen.headers["Content-Length"] == str(len(raw))
    assert (seen.size, seen.sha256) == (len(raw), hashlib.sha256(raw).hexdigest())


async def test_chunked_body_is_streamed_chunked(proxy_env: ProxyEnv) -> None:
    await proxy_env.pvc("x")
    digest = hashlib.sha256()
    blocks = [os.urandom(300_000) for _ in range(7)]
    for block in blocks:
        digest.update(block)

    async def generate() -> object:
        for block in blocks:
            yield block
            await asyncio.sleep(0)

    reply = await proxy_env.send("/v1beta1/upload", token=proxy_env.token("x"), data=generate())
    assert reply.status == 200
    (seen,) = proxy_env.sink.requests
    assert seen.headers.get("Transfer-Encoding") == "chunked"
    assert (seen.size, seen.sha256) == (sum(map(len, blocks)), digest.hexdigest())


async def test_upstream_statuses_and_bodies_come_back(proxy_env: ProxyEnv) -> None:
    await proxy_env.pvc("x")
    proxy_env.sink.answer(
        status=400,
        body=b"Saving stream failed: effective image size is larger than the reported available",
        headers={"Content-Type": "text/plain; charset=utf-8", "X-Upload": "yes"},
    )
    reply = await proxy_env.send("/v1beta1/upload", token=proxy_env.token("x"), data=b"x")
    assert reply.status == 400
    assert reply.text.startswith("Saving stream failed")
    assert reply.headers["X-Upload"] == "yes"
    assert reply.headers["Content-Type"] == "text/plain; charset=utf-8"


async def test_early_answer_without_reading_the_body(proxy_env: ProxyEnv) -> None:
    await proxy_env.pvc("x")
    proxy_env.sink.answer(status=503, body=b"upload already in progress", read_body=False)

    async def endless() -> object:
        block = bytes(MIB)
        for _ in range(64):
            yield block

    reply = await asyncio.wait_for(
        proxy_env.send("/v1beta1/upload", token=proxy_env.token("x"), data=endless()), 20
    )
    assert (reply.status, reply.text) == (503, "upload already in progress")
    # The proxy is still fine afterwards.
    proxy_env.sink.answer(status=200)
    assert (await proxy_env.send("/v1beta1/upload", token=proxy_env.token("x"))).status == 200


async def test_upstream_down_is_502_with_the_proxy_error(proxy_env: ProxyEnv) -> None:
    await proxy_env.pvc("x")
    await proxy_env.sink.stop()
    reply = await proxy_env.send("/v1beta1/upload", token=proxy_env.token("x"), data=b"x")
    assert reply.status == 502
    assert reply.text.startswith("error in upload-proxy: ")
    assert "cdi-upload-x" in reply.text


async def test_upstream_certificate_for_another_name_is_refused(proxy_env: ProxyEnv) -> None:
    # The stand-in's certificate covers *.default.svc, *.n1.svc and *.n2.svc only.
    await proxy_env.client.create(
        NAMESPACE,
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "elsewhere"}},
    )
    await proxy_env.pvc("x", "elsewhere")
    reply = await proxy_env.send(
        "/v1beta1/upload", token=proxy_env.token("x", "elsewhere"), data=b"x"
    )
    assert reply.status == 502
    assert reply.text.startswith("error in upload-proxy: ")
    assert proxy_env.sink.requests == []


async def test_tls_material_is_read_again_after_a_tls_failure(proxy_env: ProxyEnv) -> None:
    await proxy_env.pvc("x")
    assert (await proxy_env.send("/v1beta1/upload", token=proxy_env.token("x"))).status == 200
    # The controller rotates everything: new CAs, a new upload server certificate and a new
    # client certificate. The proxy's cached context no longer verifies the server; it reads
    # the material again and retries within the same request (no body byte was read yet).
    rotated = Pki.create()
    await proxy_env.sink.stop()
    port = proxy_env.sink.port
    proxy_env.sink = Sink(rotated)
    await proxy_env.sink.start(proxy_env.tmp, port)
    await put_tls_material(proxy_env.client, rotated)
    reply = await proxy_env.send("/v1beta1/upload", token=proxy_env.token("x"), data=b"abc")
    assert reply.status == 200
    assert proxy_env.sink.requests[0].size == 3


async def test_missing_tls_material_is_503(proxy_env: ProxyEnv) -> None:
    await proxy_env.pvc("x")
    await proxy_env.client.delete(SECRET, "cdi-uploadserver-client-cert", CDI_NAMESPACE)
    reply = await proxy_env.send("/v1beta1/upload", token=proxy_env.token("x"), data=b"x")
    assert reply.status == 503
    assert reply.text.startswith("error in upload-proxy: cannot read the upload client TLS")


async def test_upstream_rejecting_the_client_cn_is_passed_back(proxy_env: ProxyEnv) -> None:
    await proxy_env.pvc("x")
    proxy_env.sink.client_name = "someone-else"
    reply = await proxy_env.send("/v1beta1/upload", token=proxy_env.token("x"), data=b"x")
    assert reply.status == 401
    assert "not accepted" in reply.text


# --- CORS -----------------------------------------------------------------------------------


async def test_cors_preflight_is_answered_on_upload_paths(proxy_env: ProxyEnv) -> None:
    reply = await proxy_env.send(
        "/v1beta1/upload-async",
        method="OPTIONS",
        headers={
            "Origin": "https://console.example",
            "Access-Control-Request-Method": "put",
            "Access-Control-Request-Headers": "authorization, content-range",
        },
    )
    assert reply.status == 204
    assert reply.headers["Access-Control-Allow-Origin"] == "*"
    assert reply.headers["Access-Control-Allow-Methods"] == "PUT"
    assert reply.headers["Access-Control-Allow-Headers"] == "authorization, content-range"
    assert proxy_env.sink.requests == []


async def test_cors_headers_on_answers_to_cross_origin_requests(proxy_env: ProxyEnv) -> None:
    await proxy_env.pvc("x")
    origin = {"Origin": "https://console.example"}
    refused = await proxy_env.send("/v1beta1/upload", headers=origin)
    assert refused.status == 400
    assert refused.headers["Access-Control-Allow-Origin"] == "*"
    proxy_env.sink.answer(headers={"Upload-Offset": "3"})
    ok = await proxy_env.send("/v1beta1/upload", token=proxy_env.token("x"), headers=origin)
    assert ok.status == 200
    assert ok.headers["Access-Control-Allow-Origin"] == "*"
    assert ok.headers["Access-Control-Expose-Headers"] == "Upload-Offset"
    plain = await proxy_env.send("/v1beta1/upload", token=proxy_env.token("x"))
    assert "Access-Control-Allow-Origin" not in plain.headers


# --- service mode ---------------------------------------------------------------------------


async def test_service_mode_targets_the_service_dns_name(proxy_env: ProxyEnv) -> None:
    pvc = await proxy_env.pvc("my.disk", "n1", pod=False)
    settings = proxy_env.settings.__class__(resolve=ResolveMode.SERVICE)
    endpoint = await upstream_endpoint(
        proxy_env.client, settings, pvc, "/v1beta1/upload-async", "a=b"
    )
    assert endpoint == Endpoint(
        "https://cdi-upload-my-disk.n1.svc:8443/v1beta1/upload-async?a=b",
        "cdi-upload-my-disk.n1.svc",
        "cdi-upload-my.disk",
    )
    # Nothing resolves that name here: the proxy answers 502, not a hang or a 500.
    base = await proxy_env.start_proxy(resolve=ResolveMode.SERVICE, upstream_connect_timeout=5)
    reply = await proxy_env.send(
        "/v1beta1/upload", token=proxy_env.token("my.disk", "n1"), data=b"x", base=base
    )
    assert reply.status == 502
    assert reply.text.startswith("error in upload-proxy: ")


async def test_pvc_read_through_the_api_each_time(proxy_env: ProxyEnv) -> None:
    # The proxy keeps no PVC cache: a PVC that finished between two requests is refused.
    await proxy_env.pvc("x")
    assert (await proxy_env.send("/v1beta1/upload", token=proxy_env.token("x"))).status == 200
    await proxy_env.annotate("x", "default", {ann.POD_PHASE: "Succeeded"})
    assert (await proxy_env.send("/v1beta1/upload", token=proxy_env.token("x"))).status == 503
    await proxy_env.client.delete(PERSISTENT_VOLUME_CLAIM, "x", "default")
    assert (await proxy_env.send("/v1beta1/upload", token=proxy_env.token("x"))).status == 503


async def test_client_going_away_mid_upload_is_logged_and_harmless(
    proxy_env: ProxyEnv, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="uploadproxy")
    await proxy_env.pvc("x")
    host, port = proxy_env.url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        (
            "POST /v1beta1/upload HTTP/1.1\r\n"
            f"Host: {host}\r\n"
            f"Authorization: Bearer {proxy_env.token('x')}\r\n"
            f"Content-Length: {64 * MIB}\r\n\r\n"
        ).encode()
    )
    writer.write(bytes(2 * MIB))
    await writer.drain()

    def forwarded() -> bool:
        return any("pvc=default/x" in r.getMessage() for r in caplog.records)

    await asyncio.sleep(0.3)  # let the proxy pass some of it on
    writer.transport.abort()
    deadline = time.monotonic() + 10
    while not forwarded():
        assert time.monotonic() < deadline, "the proxy never finished the request"
        await asyncio.sleep(0.05)
    (line,) = [r.getMessage() for r in caplog.records if "pvc=default/x" in r.getMessage()]
    assert "client_error=" in line
    # The proxy (and its connection pool) still works.
    reply = await proxy_env.send("/v1beta1/upload", token=proxy_env.token("x"), data=b"abc")
    assert reply.status == 200
    assert proxy_env.sink.requests[-1].size == 3


async def test_refusal_before_the_body_reaches_the_client_with_no_body_sent(
    proxy_env: ProxyEnv,
) -> None:
    """The relay sends `Expect: 100-continue` upstream: an upload server that refuses at once
    (busy, finished) answers before a body byte moves, and the client gets that answer."""
    await proxy_env.pvc("x")
    token = proxy_env.token("x")
    proxy_env.sink.answer(status=503, body=b"upload already in progress", before_continue=True)
    reply = await proxy_env.send("/v1beta1/upload", token=token, data=io.BytesIO(bytes(8 * MIB)))
    assert (reply.status, reply.text) == (503, "upload already in progress")
    refused = proxy_env.sink.requests[-1]
    assert (refused.headers["Expect"], refused.size) == ("100-continue", 0)
    proxy_env.sink.answer(status=200, body=b"ok")
    reply = await proxy_env.send("/v1beta1/upload", token=token, data=io.BytesIO(bytes(3 * MIB)))
    assert (reply.status, reply.text) == (200, "ok")
    assert proxy_env.sink.requests[-1].size == 3 * MIB


async def test_answer_breaking_off_cuts_the_client_connection(
    proxy_env: ProxyEnv, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="uploadproxy")
    await proxy_env.pvc("x")
    proxy_env.sink.answer(status=200, body=bytes(MIB), cut_after=1000)
    with pytest.raises(aiohttp.ClientPayloadError):
        await proxy_env.send("/v1beta1/upload", token=proxy_env.token("x"), data=b"abc")
    lines = [r.getMessage() for r in caplog.records if "pvc=default/x" in r.getMessage()]
    assert len(lines) == 1
    assert "status=200" in lines[0]
    assert "answer_error=" in lines[0]
