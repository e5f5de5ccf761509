"""`cdi image-upload dv|pvc NAME --image-path=FILE | --archive-path=FILE`: virtctl's command.

Owns the flow and messages of `virtctl image-upload` (reference §6.8), with its flags: create
(or reuse) the upload target, wait for its upload server, get a token (UploadTokenRequest), ask
the proxy for the async path, send the file, wait for processing. Beyond virtctl: a progress
bar with rate and ETA, `--checksum` (the file is verified before anything is sent), resuming a
dropped upload from where it stopped (against a proxy that offers it, `cdi.cli.transfer`), and
no false failure: when the connection drops after the last byte, the target's state decides,
not the broken socket.

Called by `cdi.cli.main`. Talks to the API with `cdi.kube` and to the proxy through
`cdi.cli.transfer`.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import sys
import time
from pathlib import Path
from typing import Any, Final

from cdi.api import annotations as ann
from cdi.api import parse_size
from cdi.api.groups import (
    CDI_CONFIG,
    CDI_CONFIG_NAME,
    DATA_VOLUME,
    PERSISTENT_VOLUME_CLAIM,
    UPLOAD_TOKEN_REQUEST,
)
from cdi.api.phases import DataVolumePhase, PodPhase
from cdi.api.quantity import QuantityError
from cdi.cli.cluster import EXIT_OK, add_api_options, fail, run_command
from cdi.cli.transfer import (
    ByteProgress,
    ConnectionLost,
    Uploader,
    UploadError,
    proxy_ssl_context,
)
from cdi.kube.client import Client
from cdi.kube.errors import NotFound

POLL: Final = 2.0
#: How long processing may take after the bytes are in (virtctl: 24 h).
PROCESSING_TIMEOUT: Final = 24 * 3600.0
TOKEN_NAME: Final = "token-for-virtctl"
#: Tokens live 5 minutes; ask for a new one when this one is older.
TOKEN_REFRESH: Final = 240.0
CHECKSUM_ALGORITHMS: Final = ("md5", "sha1", "sha256", "sha512")

EPILOG = """examples:
  cdi image-upload dv fedora --size 10Gi --image-path Fedora.qcow2
  cdi image-upload pvc disk1 --size 2Gi --image-path disk.raw.xz --volume-mode block
  cdi image-upload dv files --size 1Gi --archive-path files.tar --checksum sha256:0f3a...
  cdi image-upload dv fedora --no-create --image-path Fedora.qcow2   # into an existing target
"""


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "image-upload",
        help="upload a local disk image into a DataVolume or PVC (virtctl image-upload)",
        usage=(
            "cdi image-upload (dv|pvc) NAME (--image-path FILE | --archive-path FILE) "
            "[--size SIZE] [options]"
        ),
        description=(
            "Create an upload target (a DataVolume with source.upload, or a PVC annotated as "
            "an upload target), wait for its upload server, and send FILE through the upload "
            "proxy. qcow2, raw, vmdk, vdi, vhd(x) and iso, possibly gz/xz/zst compressed; "
            "--archive-path sends a tar to unpack into the volume. A dropped connection is "
            "resumed where it stopped when the proxy offers it."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("kind", choices=("dv", "pvc"), help="the target: DataVolume or PVC")
    parser.add_argument("name", metavar="NAME")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--image-path", type=Path, metavar="FILE", help="the disk image")
    what.add_argument("--archive-path", type=Path, metavar="FILE", help="a tar to unpack")
    parser.add_argument("--size", help="size of the volume to create: 10Gi, 500M")
    parser.add_argument("--storage-class", help="StorageClass of a new volume")
    parser.add_argument(
        "--access-mode",
        choices=("ReadWriteOnce", "ReadWriteMany", "ReadOnlyMany", "ReadWriteOncePod"),
        help="access mode of a new volume [the StorageProfile's]",
    )
    parser.add_argument("--volume-mode", choices=("block", "filesystem"))
    parser.add_argument(
        "--no-create", action="store_true", help="upload into an existing DataVolume/PVC"
    )
    parser.add_argument(
        "--force-bind",
        action="store_true",
        help="bind a WaitForFirstConsumer volume at once (storage.bind.immediate.requested)",
    )
    parser.add_argument(
        "--wait-secs", type=int, default=300, help="seconds to wait for the upload server [300]"
    )
    parser.add_argument("--uploadproxy-url", help="the proxy [CDIConfig status.uploadProxyURL]")
    parser.add_argument(
        "--insecure", action="store_true", help="do not verify the proxy's certificate"
    )
    parser.add_argument(
        "--retry", type=int, default=5, help="attempts after a dropped connection [5]"
    )
    parser.add_argument(
        "--checksum", help="verify the file before sending: ALGO:HEX (sha256, sha512, md5, sha1)"
    )
    add_api_options(parser)
    parser.set_defaults(handler=run)


def _checksum(text: str) -> tuple[str, str]:
    algo, sep, digest = text.partition(":")
    algo = algo.lower()
    if not sep or algo not in CHECKSUM_ALGORITHMS or not digest:
        raise ValueError(
            f"--checksum {text!r}: use ALGO:HEX with ALGO one of {', '.join(CHECKSUM_ALGORITHMS)}"
        )
    return algo, digest.lower()


def _file_digest(path: Path, algo: str) -> str:
    digest = hashlib.new(algo)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def run(args: argparse.Namespace) -> int:
    path: Path = args.image_path or args.archive_path
    archive = args.archive_path is not None
    if not path.is_file():
        return fail(f"{path}: no such file")
    try:
        size = path.stat().st_size
        with path.open("rb"):
            pass
    except OSError as err:
        return fail(f"{path}: {err.strerror}")
    if args.size is not None:
        try:
            parse_size(args.size)
        except (QuantityError, ValueError) as err:
            return fail(f"--size {args.size!r}: {err}")
    if args.access_mode == "ReadOnlyMany":
        return fail("--access-mode ReadOnlyMany: an upload target must be writable")
    expected = None
    if args.checksum:
        try:
            expected = _checksum(args.checksum)
        except ValueError as err:
            return fail(str(err))
        actual = _file_digest(path, expected[0])
        if actual != expected[1]:
            return fail(
                f"{path}: {expected[0]} is {actual}, not {expected[1]} as --checksum says; "
                "nothing was sent"
            )

    async def command(client: Client, namespace: str | None) -> int:
        return await _upload(client, namespace or "default", args, path, size=size, archive=archive)

    return run_command(args, command, on_interrupt=_interrupted)


def _interrupted() -> int:
    return fail("interrupted; the upload target stays as it is (run again to continue)")


async def _upload(
    client: Client,
    namespace: str,
    args: argparse.Namespace,
    path: Path,
    *,
    size: int,
    archive: bool,
) -> int:
    out = sys.stdout
    name = str(args.name)
    if not await _target(client, namespace, args, archive):
        return 1
    if not await _wait_ready(client, namespace, args):
        return 1
    url = await _proxy_url(client, args)
    if url is None:
        return fail("uploadproxy URL not found: pass --uploadproxy-url or set CDIConfig")
    print(f"Uploading data to {url}", file=out, flush=True)
    token: dict[str, Any] = {"value": "", "at": 0.0}

    async def tokens() -> str:
        if time.monotonic() - float(token["at"]) > TOKEN_REFRESH:
            token["value"] = await _token(client, namespace, name)
            token["at"] = time.monotonic()
        return str(token["value"])

    ctx = proxy_ssl_context(
        insecure=args.insecure, ca_file=client.config.ca_file, ca_data=client.config.ca_data
    )
    async with Uploader(url, tokens, ssl_context=ctx, retries=args.retry) as uploader:
        try:
            caps = await uploader.capabilities()
            with ByteProgress(out, total=size, label=path.name) as progress:
                await uploader.send(path, size, progress, caps=caps)
        except UploadError as err:
            return fail(str(err))
        except ConnectionLost as err:
            # The bytes may all be in and the server done: the target says, not the socket.
            if not await _processing_done(client, namespace, args, quick=True):
                return fail(f"upload failed after {args.retry} retries: {err}")
    print(
        "Uploading data completed successfully, waiting for processing to complete, you can "
        "hit ctrl-c without interrupting the progress",
        file=out,
        flush=True,
    )
    if not await _processing_done(client, namespace, args):
        return 1
    print("Processing completed successfully", file=out)
    print(f"Uploading {path} completed successfully", file=out, flush=True)
    return EXIT_OK


async def _get(client: Client, res: Any, name: str, namespace: str) -> dict[str, Any] | None:
    try:
        return await client.get(res, name, namespace)
    except NotFound:
        return None


async def _target(client: Client, namespace: str, args: argparse.Namespace, archive: bool) -> bool:
    name = str(args.name)
    content = "archive" if archive else "kubevirt"
    pvc = await _get(client, PERSISTENT_VOLUME_CLAIM, name, namespace)
    if pvc is not None:
        notes = pvc["metadata"].get("annotations") or {}
        if notes.get(ann.POD_PHASE) == PodPhase.SUCCEEDED:
            fail(f"PVC {namespace}/{name} already successfully imported/cloned/updated")
            return False
        if ann.UPLOAD_TARGET not in notes:
            if not args.no_create:
                fail(
                    f"PVC {namespace}/{name} exists and is not an upload target; pass "
                    "--no-create to upload into it"
                )
                return False
            await client.patch(
                PERSISTENT_VOLUME_CLAIM,
                name,
                {"metadata": {"annotations": {ann.UPLOAD_TARGET: "", ann.CONTENT_TYPE: content}}},
                namespace,
            )
        print(f"Using existing PVC {namespace}/{name}", flush=True)
        return True
    if args.kind == "dv" and await _get(client, DATA_VOLUME, name, namespace) is not None:
        print(f"Using existing DataVolume {namespace}/{name}", flush=True)
        return True
    if args.no_create:
        fail(f"{'DataVolume' if args.kind == 'dv' else 'PVC'} {namespace}/{name} not found")
        return False
    if args.size is None:
        fail("--size is required to create the upload target")
        return False
    annotations = {ann.BIND_IMMEDIATE_REQUESTED: ""} if args.force_bind else {}
    if args.kind == "dv":
        storage: dict[str, Any] = {"resources": {"requests": {"storage": args.size}}}
        _volume_options(storage, args)
        spec: dict[str, Any] = {"source": {"upload": {}}, "storage": storage}
        if archive:
            spec["contentType"] = "archive"
        manifest = {
            "apiVersion": DATA_VOLUME.api_version,
            "kind": DATA_VOLUME.kind,
            "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
            "spec": spec,
        }
        await client.create(DATA_VOLUME, manifest, namespace)
        print(f"DataVolume {namespace}/{name} created", flush=True)
        return True
    pvc_spec: dict[str, Any] = {
        "accessModes": [args.access_mode or "ReadWriteOnce"],
        "resources": {"requests": {"storage": args.size}},
    }
    _volume_options(pvc_spec, args)
    manifest = {
        "apiVersion": PERSISTENT_VOLUME_CLAIM.api_version,
        "kind": PERSISTENT_VOLUME_CLAIM.kind,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "annotations": {**annotations, ann.UPLOAD_TARGET: "", ann.CONTENT_TYPE: content},
        },
        "spec": pvc_spec,
    }
    await client.create(PERSISTENT_VOLUME_CLAIM, manifest, namespace)
    print(f"PVC {namespace}/{name} created", flush=True)
    return True


def _volume_options(spec: dict[str, Any], args: argparse.Namespace) -> None:
    if args.storage_class:
        spec["storageClassName"] = args.storage_class
    if args.access_mode:
        spec["accessModes"] = [args.access_mode]
    if args.volume_mode:
        spec["volumeMode"] = "Block" if args.volume_mode == "block" else "Filesystem"


async def _wait_ready(client: Client, namespace: str, args: argparse.Namespace) -> bool:
    name = str(args.name)
    print(f"Waiting for PVC {name} upload pod to be ready...", flush=True)
    deadline = time.monotonic() + args.wait_secs
    while True:
        if args.kind == "dv":
            dv = await _get(client, DATA_VOLUME, name, namespace)
            phase = str(((dv or {}).get("status") or {}).get("phase") or "")
            if phase == DataVolumePhase.UPLOAD_READY:
                break
            if phase == DataVolumePhase.FAILED:
                fail(f"DataVolume {namespace}/{name} failed: {_running_message(dv or {})}")
                return False
            if phase == DataVolumePhase.SUCCEEDED:
                fail(f"DataVolume {namespace}/{name} already successfully imported")
                return False
            if (
                phase
                in (DataVolumePhase.WAIT_FOR_FIRST_CONSUMER, DataVolumePhase.PENDING_POPULATION)
                and not args.force_bind
            ):
                fail(
                    f"DataVolume {namespace}/{name} is in phase {phase}: its volume binds "
                    "only once a pod uses it; pass --force-bind to bind it now"
                )
                return False
        else:
            pvc = await _get(client, PERSISTENT_VOLUME_CLAIM, name, namespace)
            notes = ((pvc or {}).get("metadata") or {}).get("annotations") or {}
            if notes.get(ann.POD_READY) == "true":
                break
        if time.monotonic() > deadline:
            fail(
                f"timed out after {args.wait_secs}s waiting for the upload server of "
                f"{namespace}/{name} (raise --wait-secs)"
            )
            return False
        await asyncio.sleep(POLL)
    print("Pod now ready", flush=True)
    return True


def _running_message(dv: dict[str, Any]) -> str:
    for cond in (dv.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Running":
            return str(cond.get("message") or "")
    return ""


async def _proxy_url(client: Client, args: argparse.Namespace) -> str | None:
    url = args.uploadproxy_url
    if not url:
        config = await _get(client, CDI_CONFIG, CDI_CONFIG_NAME, "")
        url = ((config or {}).get("status") or {}).get("uploadProxyURL")
    if not url:
        return None
    url = str(url)
    return url if "://" in url else f"https://{url}"


async def _token(client: Client, namespace: str, name: str) -> str:
    request = {
        "apiVersion": UPLOAD_TOKEN_REQUEST.api_version,
        "kind": UPLOAD_TOKEN_REQUEST.kind,
        "metadata": {"name": TOKEN_NAME, "namespace": namespace},
        "spec": {"pvcName": name},
    }
    answer = await client.create(UPLOAD_TOKEN_REQUEST, request, namespace)
    return str((answer.get("status") or {}).get("token") or "")


async def _processing_done(
    client: Client, namespace: str, args: argparse.Namespace, *, quick: bool = False
) -> bool:
    """Wait until the target says it is filled (True), failed, or time is up (False). `quick`
    only looks a few times: is a dropped last request a success after all?"""
    name = str(args.name)
    deadline = time.monotonic() + (3 * POLL if quick else PROCESSING_TIMEOUT)
    while True:
        pvc = await _get(client, PERSISTENT_VOLUME_CLAIM, name, namespace)
        notes = ((pvc or {}).get("metadata") or {}).get("annotations") or {}
        if notes.get(ann.POD_PHASE) == PodPhase.SUCCEEDED:
            return True
        if args.kind == "dv":
            dv = await _get(client, DATA_VOLUME, name, namespace)
            phase = ((dv or {}).get("status") or {}).get("phase")
            if phase == DataVolumePhase.SUCCEEDED:
                return True
            if phase == DataVolumePhase.FAILED and not quick:
                fail(f"processing failed: {_running_message(dv or {})}")
                return False
        if time.monotonic() > deadline:
            if not quick:
                fail(f"timed out waiting for {namespace}/{name} to be processed")
            return False
        await asyncio.sleep(POLL)
