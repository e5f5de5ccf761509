"""`cdi clone`: a new volume from an existing PVC, as a DataVolume with a `pvc` source (CDI §7).

Owns the command's arguments and help, and the DataVolume it creates: CDI v1beta1, the storage
API (no size unless `--size`: CDI sizes a clone from its source), `spec.source.pvc` naming the
source (`SRC_PVC` alone means the target namespace) and, with `--strategy`, the annotation
`cdi.kubevirt.io/clone-strategy`, which our controller honours before the CDI resource and the
StorageProfile (CDI itself has no per-DataVolume choice). Bad input is refused before anything is
created, with exit 2: names, sizes, a target that would be its own source, and CDI's admission
rules (`validate_datavolume`). A source PVC that is not there yet is a warning, not an error:
the clone waits for it, as CDI's does. A target smaller than an existing source is refused.

Creating and following: `cdi.cli.cluster` (client, errors as one line: the API's refusal of a
cross-namespace clone, `AlreadyExists`), `cdi.cli.waiting` and `cdi.cli.progress` (`--wait`, as
`cdi import --wait`: CloneScheduled, CloneInProgress with the DataVolume's progress, Succeeded).

Called by `cdi.cli.main` through `register`. Must not write anything but the DataVolume.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from dataclasses import dataclass
from typing import Any, Final

from cdi.api import VolumeMode, parse_size
from cdi.api import annotations as ann
from cdi.api.groups import DATA_VOLUME, PERSISTENT_VOLUME_CLAIM
from cdi.api.phases import CloneStrategy
from cdi.api.quantity import QuantityError
from cdi.cli.cluster import EXIT_OK, add_api_options, duration_arg, fail, run_command
from cdi.cli.datavolumes import UsageError, access_mode_arg, size_arg, wait_until_succeeded
from cdi.controller.rendering import validate_datavolume
from cdi.kube.client import Client
from cdi.kube.errors import Forbidden, NotFound

Obj = dict[str, Any]

EXIT_USAGE: Final = 2
"""Bad input, nothing created: argparse's code, also for the checks that need the API."""
CLONE_STRATEGY: Final = ann.STORAGE_CLASS_CLONE_STRATEGY
"""`cdi.kubevirt.io/clone-strategy`: CDI's key on StorageClasses; ours also on a DataVolume."""

_LABEL: Final = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_SUBDOMAIN: Final = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_NAMESPACE: Final = re.compile(_LABEL)
NAME_MAX: Final = 253
NAMESPACE_MAX: Final = 63

DESCRIPTION: Final = """\
Create a DataVolume NEW_NAME whose volume is a copy of the PVC SRC_PVC, in namespace SRC_NS or,
without it, the target namespace (-n, else the kubeconfig context's). Without --size the new
volume is as large as the source needs. A source that does not exist yet is waited for. With
--wait, follow the clone (a progress bar on a terminal, a line per change otherwise) until it
succeeds or fails."""

EPILOG: Final = """\
examples:
  cdi clone golden/fedora-40 my-fedora --wait
  cdi clone base-disk base-copy -n dev --size 20Gi
  cdi clone images/win11 win11-vm1 --strategy copy --storage-class local --volume-mode block

cloning from another namespace:
  The API refuses it unless you may, in the source namespace, `create` datavolumes/source
  (API group cdi.kubevirt.io, the source PVC's name) or `create` pods, as in CDI:
    kind: ClusterRole   rules: [{apiGroups: [cdi.kubevirt.io], resources: [datavolumes/source],
                                 verbs: [create]}]
  bound by a RoleBinding in the source namespace.

--strategy:
  copy (host-assisted: a pod streams the data), snapshot (a VolumeSnapshot of the source,
  restored), csi-clone (the CSI driver clones). Recorded as the DataVolume's annotation
  cdi.kubevirt.io/clone-strategy, which this controller honours before the CDI resource's
  cloneStrategyOverride and the StorageProfile; CDI itself ignores it. A strategy the storage
  cannot do falls back to copy.

exit status: 0 created (with --wait: Succeeded), 1 failed, timed out, refused by the API or
API error, 2 bad arguments (nothing is created)."""


@dataclass(frozen=True, slots=True)
class Source:
    """SRC as given: the namespace is None when it was left out (the target's)."""

    namespace: str | None
    name: str

    def where(self, target_namespace: str) -> str:
        return f"{self.namespace or target_namespace}/{self.name}"


# --- arguments ---------------------------------------------------------------------------------
def register(sub: Any) -> None:
    parser = sub.add_parser(
        "clone",
        help="clone a PVC into a new volume (creates a DataVolume)",
        usage="cdi clone [SRC_NS/]SRC_PVC NEW_NAME [-n NS] [--size SIZE] [options]",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "source",
        type=source_arg,
        metavar="[SRC_NS/]SRC_PVC",
        help="the PVC to copy; without SRC_NS/, in the target namespace",
    )
    parser.add_argument(
        "name", type=name_arg, metavar="NEW_NAME", help="name of the DataVolume and of its PVC"
    )
    parser.add_argument(
        "--size", type=size_arg, help="volume size, a quantity: 10Gi, 500M [the source's]"
    )
    parser.add_argument(
        "--strategy",
        choices=[s.value for s in CloneStrategy],
        help="copy, snapshot or csi-clone (see below) [the StorageProfile's choice]",
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
    parser.add_argument("--wait", action="store_true", help="follow the clone until it ends")
    parser.add_argument(
        "--timeout",
        type=duration_arg,
        metavar="DURATION",
        help="with --wait: give up after this long (90s, 10m, 1h) [no limit]",
    )
    add_api_options(parser)
    parser.set_defaults(handler=functools.partial(run_clone, parser=parser))


def _name_problem(text: str, what: str) -> str | None:
    if len(text) > NAME_MAX or not _SUBDOMAIN.fullmatch(text):
        return (
            f"{text!r} is not a valid {what}: lowercase letters, digits, '-' and '.', starting "
            f"and ending with a letter or digit, at most {NAME_MAX} characters"
        )
    return None


def name_arg(text: str) -> str:
    if problem := _name_problem(text, "name"):
        raise argparse.ArgumentTypeError(problem)
    return text


def source_arg(text: str) -> Source:
    """SRC_NS/SRC_PVC or SRC_PVC."""
    namespace, slash, name = text.rpartition("/")
    if slash and not namespace:
        raise argparse.ArgumentTypeError(f"{text!r}: use SRC_NS/SRC_PVC, or SRC_PVC alone")
    if slash and (len(namespace) > NAMESPACE_MAX or not _NAMESPACE.fullmatch(namespace)):
        raise argparse.ArgumentTypeError(
            f"{namespace!r} is not a valid namespace: lowercase letters, digits and '-', "
            f"starting and ending with a letter or digit, at most {NAMESPACE_MAX} characters"
        )
    if problem := _name_problem(name, "PVC name"):
        raise argparse.ArgumentTypeError(problem)
    return Source(namespace or None, name)


# --- the DataVolume ----------------------------------------------------------------------------
def clone_manifest(args: argparse.Namespace, namespace: str) -> Obj:
    """The DataVolume `cdi clone` creates in `namespace`; a UsageError if CDI would refuse it."""
    source: Source = args.source
    storage: Obj = {}
    if args.size:
        storage["resources"] = {"requests": {"storage": args.size}}
    if args.storage_class:
        storage["storageClassName"] = args.storage_class
    if args.volume_mode:
        mode = VolumeMode.BLOCK if args.volume_mode == "block" else VolumeMode.FILESYSTEM
        storage["volumeMode"] = mode.value
    if args.access_modes:
        storage["accessModes"] = list(dict.fromkeys(args.access_modes))
    metadata: Obj = {"name": args.name}
    if args.strategy:
        metadata["annotations"] = {CLONE_STRATEGY: args.strategy}
    manifest: Obj = {
        "apiVersion": DATA_VOLUME.api_version,
        "kind": DATA_VOLUME.kind,
        "metadata": metadata,
        "spec": {
            "source": {"pvc": {"namespace": source.namespace or namespace, "name": source.name}},
            "storage": storage,
        },
    }
    # CDI's own admission rules: on a cluster its webhook would refuse the same, less early.
    if problems := validate_datavolume(manifest):
        raise UsageError("; ".join(problems))
    return manifest


def _requested(pvc: Obj) -> tuple[str, int] | None:
    """The size a PVC asked for, as written and in bytes; None if it says nothing readable."""
    requests = ((pvc.get("spec") or {}).get("resources") or {}).get("requests") or {}
    raw = requests.get("storage")
    try:
        return (str(raw), parse_size(str(raw))) if raw is not None else None
    except QuantityError:
        return None


# --- the command -------------------------------------------------------------------------------
def run_clone(args: argparse.Namespace, *, parser: argparse.ArgumentParser) -> int:
    if args.timeout is not None and not args.wait:
        parser.error("--timeout applies to --wait; add --wait")
    try:
        # The namespace changes nothing CDI's rules look at: check before connecting.
        clone_manifest(args, args.namespace or "default")
    except UsageError as err:
        parser.error(str(err))
    name: str = args.name
    source: Source = args.source
    size = parse_size(args.size) if args.size else 0
    created = False

    async def command(client: Client, namespace: str | None) -> int:
        nonlocal created, size
        assert namespace is not None  # no --all-namespaces here
        where = source.where(namespace)
        if (source.namespace or namespace) == namespace and source.name == name:
            return fail(
                f"{name}: the new volume cannot be its own source ({where}); pick another name",
                code=EXIT_USAGE,
            )
        manifest = clone_manifest(args, namespace)
        try:
            pvc = await client.get(
                PERSISTENT_VOLUME_CLAIM, source.name, source.namespace or namespace
            )
        except NotFound:
            print(
                f"cdi: warning: source PVC {where} does not exist yet; the clone waits for it",
                file=sys.stderr,
                flush=True,
            )
        except Forbidden:
            pass  # reading PVCs there is not needed to clone; the API decides on the clone
        else:
            has = _requested(pvc)
            if size and has is not None and size < has[1]:
                return fail(
                    f"--size {args.size} is smaller than the source PVC {where} ({has[0]}); a "
                    "clone needs at least the source's size",
                    code=EXIT_USAGE,
                )
            # Without --size the bar measures against the source's size.
            size = size or (has[1] if has is not None else 0)
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
            f"stopped waiting; datavolume/{name} goes on cloning (follow it with "
            f"`cdi get dv {name} -w`)"
        )

    return run_command(args, command, on_interrupt=interrupted)
