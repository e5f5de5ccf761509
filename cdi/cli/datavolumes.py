"""`cdi import`, `cdi get dv` and `cdi wait dv`: DataVolumes from the command line.

Owns the three commands' arguments and help, and the DataVolume `cdi import` creates (CDI
v1beta1, storage API, an http, s3 or blank source), checked before the API is contacted: sizes,
URLs, and CDI's own admission rules (`validate_datavolume`), so that bad input creates nothing.
The handlers tie together the pieces that live next door: `cdi.cli.cluster` (options, client,
error lines), `cdi.cli.waiting` (following a DataVolume to a goal), `cdi.cli.progress` (what
`--wait` shows) and `cdi.cli.listing` (what `get` prints).

Called by `cdi.cli.main` through `register`. Must not write anything but the DataVolume it was
asked to create, and must not print a traceback for an expected failure.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import urlsplit

from cdi.api import ContentType, DataVolumePhase, QuantityError, VolumeMode, parse_size
from cdi.api.groups import DATA_VOLUME, Resource
from cdi.api.phases import AccessMode
from cdi.cli.cluster import (
    EXIT_ERROR,
    EXIT_OK,
    add_api_options,
    duration_arg,
    fail,
    run_command,
)
from cdi.cli.listing import Printer, follow
from cdi.cli.progress import display_for
from cdi.cli.waiting import DEFAULT_WAIT_TIMEOUT, Goal, goal_arg, wait_for
from cdi.controller.rendering import validate_datavolume
from cdi.kube.client import Client
from cdi.kube.errors import NotFound

Obj = dict[str, Any]

#: The words `cdi get` and `cdi wait` take for a kind; more kinds join this table later.
RESOURCES: Final[Mapping[str, Resource]] = {
    "dv": DATA_VOLUME,
    "dvs": DATA_VOLUME,
    "datavolume": DATA_VOLUME,
    "datavolumes": DATA_VOLUME,
}
ACCESS_MODE_SHORT: Final = {
    "rwo": AccessMode.READ_WRITE_ONCE,
    "rox": AccessMode.READ_ONLY_MANY,
    "rwx": AccessMode.READ_WRITE_MANY,
    "rwop": AccessMode.READ_WRITE_ONCE_POD,
}
RESOURCE_HELP: Final = "dv (also dvs, datavolume, datavolumes)"

IMPORT_EPILOG: Final = """\
examples:
  cdi import fedora --url https://example.com/fedora.qcow2 --size 10Gi --wait
  cdi import win --s3 https://s3.eu-west-1.amazonaws.com/images/win.vhdx --secret s3-creds \\
      --size 64Gi --volume-mode block
  cdi import scratch --blank --size 8Gi

exit status: 0 created (with --wait: Succeeded), 1 failed, timed out or API error,
2 bad arguments (nothing is created)."""
GET_EPILOG: Final = """\
examples:
  cdi get dv                   DataVolumes of the current namespace
  cdi get dv fedora -o yaml    one, in full
  cdi get dv -A -w             every namespace, then a row per change (Ctrl-C stops)"""
WAIT_EPILOG: Final = """\
Unlike `kubectl wait`, a DataVolume that does not exist yet is waited for (until the timeout)
instead of being an error, so `cdi wait` may run before or after the `cdi import`.

examples:
  cdi wait dv fedora --for=Succeeded --timeout 30m
  cdi wait dv fedora --for=condition=Ready

exit status: 0 condition met, 1 Failed (with the reason), timed out or API error."""


class _Help(argparse.HelpFormatter):
    """Wraps a one-paragraph description; keeps text laid out by hand (the examples) as is."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class UsageError(ValueError):
    """Arguments that cannot make a valid DataVolume; nothing was sent to the API."""


# --- arguments ---------------------------------------------------------------------------------
def register(sub: Any) -> None:
    _register_import(sub)
    _register_get(sub)
    _register_wait(sub)


def _register_import(sub: Any) -> None:
    parser = sub.add_parser(
        "import",
        help="import a disk image into a new volume (creates a DataVolume)",
        usage="cdi import NAME (--url URL | --s3 URL | --blank) --size SIZE [options]",
        description=(
            "Create a DataVolume that fills a new volume (PVC) NAME: from an http(s) URL, from "
            "S3, or blank. The image may be qcow2, raw, vmdk, vdi, vhd(x) or iso, possibly "
            "gzip/xz/zstd compressed; it is checked before conversion. With --wait, follow "
            "the import (a progress bar on a terminal, a line per change otherwise) until it "
            "succeeds or fails."
        ),
        epilog=IMPORT_EPILOG,
        formatter_class=_Help,
    )
    parser.add_argument("name", metavar="NAME", help="name of the DataVolume and of its PVC")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--url", type=http_url_arg, help="http(s) URL of the image")
    source.add_argument(
        "--s3",
        type=s3_url_arg,
        metavar="URL",
        help="S3 object as CDI spells it: https://HOST/BUCKET/KEY",
    )
    source.add_argument("--blank", action="store_true", help="an empty disk")
    parser.add_argument(
        "--size", required=True, type=size_arg, help="volume size, a quantity: 10Gi, 500M"
    )
    parser.add_argument("--checksum", help="verify the download: sha256:HEX (md5, sha1, sha512)")
    parser.add_argument(
        "--secret", metavar="NAME", help="Secret with accessKeyId and secretKey for the source"
    )
    parser.add_argument(
        "--cert-configmap", metavar="NAME", help="ConfigMap with CA certificates for the source"
    )
    parser.add_argument("--storage-class", metavar="CLASS", help="[the default class]")
    parser.add_argument(
        "--volume-mode",
        type=str.lower,
        choices=("block", "filesystem"),
        help="[the StorageProfile's choice]",
    )
    parser.add_argument(
        "--access-mode",
        dest="access_modes",
        action="append",
        type=access_mode_arg,
        metavar="MODE",
        help="ReadWriteOnce (RWO), ReadWriteMany (RWX), ReadOnlyMany (ROX), ReadWriteOncePod; "
        "may be repeated [the StorageProfile's choice]",
    )
    parser.add_argument(
        "--content-type",
        choices=[c.value for c in ContentType],
        default=ContentType.KUBEVIRT.value,
        help="kubevirt: a disk image; archive: a tar extracted into the volume [kubevirt]",
    )
    parser.add_argument(
        "--preallocation", action="store_true", help="allocate the whole volume in advance"
    )
    parser.add_argument("--wait", action="store_true", help="follow the import until it ends")
    parser.add_argument(
        "--timeout",
        type=duration_arg,
        metavar="DURATION",
        help="with --wait: give up after this long (90s, 10m, 1h) [no limit]",
    )
    add_api_options(parser)
    parser.set_defaults(handler=functools.partial(run_import, parser=parser))


def _register_get(sub: Any) -> None:
    parser = sub.add_parser(
        "get",
        help="list DataVolumes (like kubectl get dv)",
        usage="cdi get dv [NAME...] [-n NS | -A] [-w] [-o wide|yaml|json]",
        description=(
            "Show DataVolumes as kubectl does: NAME PHASE PROGRESS RESTARTS AGE (-o wide adds "
            "the size, the source and the message of a retrying or failed import). With -w, "
            "print a new row whenever one changes, until Ctrl-C."
        ),
        epilog=GET_EPILOG,
        formatter_class=_Help,
    )
    parser.add_argument(
        "resource", choices=sorted(RESOURCES), metavar="RESOURCE", help=RESOURCE_HELP
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="only these [all]")
    parser.add_argument(
        "-o", "--output", choices=("wide", "yaml", "json"), help="[a table]", default=None
    )
    parser.add_argument("-w", "--watch", action="store_true", help="then print every change")
    add_api_options(parser, all_namespaces=True)
    parser.set_defaults(handler=functools.partial(run_get, parser=parser))


def _register_wait(sub: Any) -> None:
    parser = sub.add_parser(
        "wait",
        help="wait for a DataVolume to reach a phase or condition (like kubectl wait)",
        usage="cdi wait dv NAME --for=PHASE|condition=NAME[=VALUE] [--timeout DURATION]",
        description=(
            "Wait until DataVolume NAME is in phase PHASE (e.g. --for=Succeeded) or has "
            "condition NAME with status VALUE (--for=condition=Ready; VALUE defaults to True). "
            "Prints 'datavolume/NAME condition met'. A Failed DataVolume ends the wait at once "
            "with its reason."
        ),
        epilog=WAIT_EPILOG,
        formatter_class=_Help,
    )
    parser.add_argument(
        "resource", choices=sorted(RESOURCES), metavar="RESOURCE", help=RESOURCE_HELP
    )
    parser.add_argument("name", metavar="NAME")
    parser.add_argument(
        "--for",
        dest="goal",
        required=True,
        type=goal_arg,
        metavar="GOAL",
        help="a phase (Succeeded, ImportInProgress, ...) or condition=NAME[=VALUE]",
    )
    parser.add_argument(
        "--timeout",
        type=duration_arg,
        default=DEFAULT_WAIT_TIMEOUT,
        metavar="DURATION",
        help=f"give up after this long (90s, 10m, 1h) [{DEFAULT_WAIT_TIMEOUT}]",
    )
    add_api_options(parser)
    parser.set_defaults(handler=run_wait)


def size_arg(text: str) -> str:
    try:
        parse_size(text)
    except QuantityError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def http_url_arg(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL")
    return text


def s3_url_arg(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme == "s3":
        # CDI's s3 source takes the endpoint's URL (its webhook refuses any other scheme, and
        # the importer needs the endpoint): saying so now beats a DataVolume that cannot work.
        raise argparse.ArgumentTypeError(
            f"{text!r}: CDI's S3 source takes the endpoint URL, https://HOST/BUCKET/KEY "
            "(on AWS https://s3.REGION.amazonaws.com/BUCKET/KEY), not s3://BUCKET/KEY"
        )
    bucket, _, key = parts.path.lstrip("/").partition("/")
    if parts.scheme not in ("http", "https") or not parts.netloc or not bucket or not key:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an S3 object URL; use https://HOST/BUCKET/KEY"
        )
    return text


def access_mode_arg(text: str) -> str:
    modes = {m.value.lower(): m.value for m in AccessMode}
    modes.update({k: v.value for k, v in ACCESS_MODE_SHORT.items()})
    try:
        return modes[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an access mode; use one of {', '.join(m.value for m in AccessMode)}"
        ) from None


# --- import ------------------------------------------------------------------------------------
def datavolume_manifest(args: argparse.Namespace) -> Obj:
    """The DataVolume `cdi import` creates, refused with a UsageError if CDI would refuse it."""
    source: Obj
    if args.blank:
        given = [
            flag
            for flag, value in (
                ("--checksum", args.checksum),
                ("--secret", args.secret),
                ("--cert-configmap", args.cert_configmap),
            )
            if value
        ]
        if given:
            raise UsageError(f"{', '.join(given)}: a blank disk has no source to read")
        source = {"blank": {}}
    else:
        kind = "http" if args.url else "s3"
        if args.checksum and kind == "s3":
            raise UsageError("--checksum: CDI's s3 source has no checksum; use --url for that")
        details: Obj = {"url": args.url or args.s3}
        if args.secret:
            details["secretRef"] = args.secret
        if args.cert_configmap:
            details["certConfigMap"] = args.cert_configmap
        if args.checksum:
            details["checksum"] = args.checksum
        source = {kind: details}
    storage: Obj = {"resources": {"requests": {"storage": args.size}}}
    if args.storage_class:
        storage["storageClassName"] = args.storage_class
    if args.volume_mode:
        mode = VolumeMode.BLOCK if args.volume_mode == "block" else VolumeMode.FILESYSTEM
        storage["volumeMode"] = mode.value
    if args.access_modes:
        storage["accessModes"] = list(dict.fromkeys(args.access_modes))
    spec: Obj = {"source": source, "storage": storage}
    if args.content_type == ContentType.ARCHIVE:
        spec["contentType"] = ContentType.ARCHIVE.value
    if args.preallocation:
        spec["preallocation"] = True
    manifest: Obj = {
        "apiVersion": DATA_VOLUME.api_version,
        "kind": DATA_VOLUME.kind,
        "metadata": {"name": args.name},
        "spec": spec,
    }
    # CDI's own admission rules: on a cluster its webhook would refuse the same, less early.
    if problems := validate_datavolume(manifest):
        raise UsageError("; ".join(problems))
    return manifest


def run_import(args: argparse.Namespace, *, parser: argparse.ArgumentParser) -> int:
    if args.timeout is not None and not args.wait:
        parser.error("--timeout applies to --wait; add --wait")
    try:
        manifest = datavolume_manifest(args)
    except UsageError as err:
        parser.error(str(err))
    name: str = args.name
    size = parse_size(args.size)
    created = False

    async def command(client: Client, namespace: str | None) -> int:
        nonlocal created
        await client.create(DATA_VOLUME, manifest, namespace)
        created = True
        print(f"datavolume/{name} created", flush=True)
        if not args.wait:
            return EXIT_OK
        return await wait_until_succeeded(client, namespace, name, size=size, limit=args.timeout)

    def interrupted() -> int:
        if not created:
            return fail("interrupted")
        return fail(
            f"stopped waiting; datavolume/{name} goes on importing (follow it with "
            f"`cdi get dv {name} -w`)"
        )

    return run_command(args, command, on_interrupt=interrupted)


async def wait_until_succeeded(
    client: Client, namespace: str | None, name: str, *, size: int, limit: float | None
) -> int:
    """`--wait` of the commands that create a DataVolume: its progress shown until Succeeded
    (exit 0), else one line saying why (Failed, gone, or `limit` seconds passed)."""
    goal = Goal(f"be {DataVolumePhase.SUCCEEDED}", phase=DataVolumePhase.SUCCEEDED)
    with display_for(sys.stdout, name=name, size=size) as display:
        outcome = await wait_for(
            client,
            namespace,
            name,
            goal,
            limit=limit,
            on_update=display.update,
            absent_fails=True,
        )
    if outcome.state == "met":
        print(f"datavolume/{name} {DataVolumePhase.SUCCEEDED}", flush=True)
        return EXIT_OK
    return fail(outcome.explain(name, goal, limit))


def run_wait(args: argparse.Namespace) -> int:
    name: str = args.name
    goal: Goal = args.goal

    async def command(client: Client, namespace: str | None) -> int:
        outcome = await wait_for(client, namespace, name, goal, limit=args.timeout)
        if outcome.state == "met":
            print(f"datavolume/{name} condition met", flush=True)
            return EXIT_OK
        return fail(outcome.explain(name, goal, args.timeout))

    return run_command(args, command)


# --- get ---------------------------------------------------------------------------------------
def run_get(args: argparse.Namespace, *, parser: argparse.ArgumentParser) -> int:
    names: list[str] = list(dict.fromkeys(args.names))
    if names and args.all_namespaces:
        parser.error("a DataVolume cannot be got by name across all namespaces; drop -A")
    printer = Printer(args.output, with_namespace=args.all_namespaces, watch=args.watch)

    async def command(client: Client, namespace: str | None) -> int:
        missing: list[str] = []
        if names:
            items: list[Obj] = []
            for name in names:
                try:
                    items.append(await client.get(DATA_VOLUME, name, namespace))
                except NotFound as err:
                    missing.append(err.message)
        else:
            items, _ = await client.list(DATA_VOLUME, namespace)
        if items:
            printer.show(items, single=len(names) == 1)
        for message in missing:
            fail(message)
        if missing:
            return EXIT_ERROR
        if not items:
            where = f" in {namespace} namespace" if namespace else ""
            print(f"No resources found{where}.", file=sys.stderr, flush=True)
        if args.watch:
            await follow(client, namespace, set(names), printer)
        return EXIT_OK

    # Ctrl-C is how a watch ends: a normal end, as for kubectl.
    return run_command(args, command, on_interrupt=lambda: EXIT_OK)
