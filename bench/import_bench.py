"""Import benchmark: `cdi-importer` over HTTP against the nbdkit + qemu-img pipeline it replaces.

What is measured, for each served image (qcow2, raw, raw.gz, raw.xz of one base image: 2 GiB
virtual with 1 GiB of random data, the rest sparse; `--quick`: 256 MiB / 128 MiB), all in the
same run and against the same nginx on 127.0.0.1:

- **ours**: `cdi-importer` with CDI's environment (`IMPORTER_SOURCE=http`, endpoint, image size =
  virtual size, no filesystem overhead, fresh data and scratch dirs, metrics off): wall time, CPU
  time of its process tree, peak RSS of the importer's own Python process (sampled `VmRSS`, and
  `VmHWM` at the last sample) and the peak summed RSS of its whole process tree (nbdkit, qemu-img).
- **baseline**: the tool pipeline an operator would use by hand,
  `nbdkit -r -U - [--filter=xz|gzip] curl url=... --run 'qemu-img convert -W -f <fmt> -O raw
  "$uri" out'`: wall time and peak tree RSS.
- **floor**: the same work on a local file, with no HTTP or NBD at all: `qemu-img convert -W` for
  raw and qcow2, `xz -dc | dd conv=sparse` or `gzip -dc | dd conv=sparse` for compressed images.

Every output (ours, baseline and floor) goes to a fresh file and is compared byte for byte with
the base image (sparse-aware); a wrong output is an error, never a number. Each measurement runs
`--repeat` times (default 2) in alternating order; the table shows best and median, and ratios of
best times. A last case imports an 8 GiB-virtual sparse qcow2 holding little data, to show the
importer's memory does not grow with the virtual size.

The targets (from the issue): ours <= 1.3x baseline for qcow2 and raw, <= 1.1x for raw.xz, and
importer peak RSS <= 100 MiB. They are reported as PASS/MISS; the exit status is 1 only when a
measurement failed (a command errored, timed out, leaked processes or wrote wrong output).

Run alone: `.venv/bin/python bench/import_bench.py [--quick] [--keep] [--repeat N]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchlib import (
    MIB,
    NginxServer,
    RunResult,
    best,
    fmt,
    measure,
    median,
    sparse_diff,
    table,
    tool_version,
)

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
OUT_DIR = BENCH_DIR / "out"
GIB = 1024 * MIB
METHODS = ("ours", "baseline", "floor")
RSS_TARGET = 100 * MIB
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


@dataclass(frozen=True)
class Sizes:
    virtual: int
    data_offset: int
    data: int
    sparse_virtual: int
    sparse_chunk: int
    """The sparse case writes four chunks of this size."""

    @staticmethod
    def for_mode(quick: bool) -> Sizes:
        if quick:
            return Sizes(256 * MIB, 64 * MIB, 128 * MIB, 8 * GIB, 4 * MIB)
        return Sizes(2 * GIB, 512 * MIB, 1 * GIB, 8 * GIB, 16 * MIB)


@dataclass(frozen=True)
class Case:
    name: str
    file: str
    """The served file, in the images directory."""
    reference: str
    """The raw image the output must equal, in the images directory."""
    fmt: str
    """qemu-img format of the (decompressed) stream."""
    compression: str | None
    """None, "gzip" or "xz": the nbdkit filter of the baseline and the floor's decompressor."""
    target_ratio: float | None
    """ours / baseline must stay at or below this (None: no time target)."""

    @property
    def floor_label(self) -> str:
        if self.compression is None:
            return "qemu-img -W local"
        return f"{self.compression} -dc | dd sparse"


CASES = (
    Case("qcow2", "disk.qcow2", "disk.raw", "qcow2", None, 1.3),
    Case("raw", "disk.raw", "disk.raw", "raw", None, 1.3),
    Case("raw.gz", "disk.raw.gz", "disk.raw", "raw", "gzip", None),
    Case("raw.xz", "disk.raw.xz", "disk.raw", "raw", "xz", 1.1),
    Case("qcow2 8G sparse", "sparse8g.qcow2", "sparse8g.raw", "qcow2", None, None),
)


@dataclass
class CaseResult:
    case: Case
    virtual_size: int
    served_bytes: int
    runs: dict[str, list[RunResult]] = field(default_factory=lambda: {m: [] for m in METHODS})

    def times(self, method: str) -> list[float]:
        return [r.wall_s for r in self.runs[method] if r.ok]

    def best(self, method: str) -> float | None:
        return best(self.times(method))

    def median(self, method: str) -> float | None:
        return median(self.times(method))

    def ratio(self, num: str, den: str, stat: str = "best") -> float | None:
        pick = self.best if stat == "best" else self.median
        a, b = pick(num), pick(den)
        return a / b if a is not None and b else None

    def peak(self, method: str, attr: str) -> int | None:
        values = [getattr(r, attr) for r in self.runs[method] if r.ok]
        return max(values) if values else None

    def importer_peak(self) -> int | None:
        values = [max(r.main_peak_rss, r.main_hwm) for r in self.runs["ours"] if r.ok]
        return max(values) if values else None

    def errors(self) -> list[str]:
        return [
            f"{self.case.name} {m} #{i + 1}: {r.error}"
            for m in METHODS
            for i, r in enumerate(self.runs[m])
            if r.error
        ]


# --------------------------------------------------------------------------------------------------
# images


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run(argv: Sequence[str | Path], *, stdout: Path | None = None, timeout: float = 1800) -> None:
    if stdout is None:
        subprocess.run(list(argv), check=True, timeout=timeout, stdin=subprocess.DEVNULL)
        return
    with open(stdout, "wb") as out:
        subprocess.run(
            list(argv), check=True, timeout=timeout, stdout=out, stdin=subprocess.DEVNULL
        )


def _write_random(path: Path, size: int, extents: Sequence[tuple[int, int]]) -> None:
    """A sparse file of `size` bytes with random data in each (offset, length) extent."""
    chunk = 8 * MIB
    with open(path, "wb") as fh:
        fh.truncate(size)
        for offset, length in extents:
            for pos in range(offset, offset + length, chunk):
                os.pwrite(fh.fileno(), os.urandom(min(chunk, offset + length - pos)), pos)


def build_images(images: Path, sizes: Sizes) -> dict[str, float]:
    """Create the base and sparse raw images and their served forms; return build seconds."""
    stamp = images / "stamp.json"
    wanted = json.dumps(asdict(sizes), sort_keys=True)
    if stamp.exists() and stamp.read_text() == wanted:
        log(f"reusing images in {images}")
        return {}
    images.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    raw = images / "disk.raw"
    steps: list[tuple[str, Any]] = [
        (
            "disk.raw",
            lambda: _write_random(raw, sizes.virtual, [(sizes.data_offset, sizes.data)]),
        ),
        (
            "disk.qcow2",
            lambda: _run(
                ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, images / "disk.qcow2"]
            ),
        ),
        ("disk.raw.gz", lambda: _run(["gzip", "-1", "-c", raw], stdout=images / "disk.raw.gz")),
        (
            "disk.raw.xz",
            lambda: _run(
                ["xz", "-T2", "-0", "--block-size=16MiB", "-c", raw],
                stdout=images / "disk.raw.xz",
            ),
        ),
        (
            "sparse8g.raw",
            lambda: _write_random(
                images / "sparse8g.raw",
                sizes.sparse_virtual,
                [
                    (0, sizes.sparse_chunk),
                    (3 * GIB + MIB, sizes.sparse_chunk),
                    (5 * GIB, sizes.sparse_chunk),
                    (sizes.sparse_virtual - sizes.sparse_chunk, sizes.sparse_chunk),
                ],
            ),
        ),
        (
            "sparse8g.qcow2",
            lambda: _run(
                [
                    "qemu-img",
                    "convert",
                    "-f",
                    "raw",
                    "-O",
                    "qcow2",
                    images / "sparse8g.raw",
                    images / "sparse8g.qcow2",
                ]
            ),
        ),
    ]
    seconds: dict[str, float] = {}
    for name, step in steps:
        start = time.perf_counter()
        step()
        seconds[name] = round(time.perf_counter() - start, 2)
        log(f"built {name} in {seconds[name]:.1f} s ({(images / name).stat().st_size} bytes)")
    stamp.write_text(wanted)
    return seconds


# --------------------------------------------------------------------------------------------------
# commands


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


def run_one(
    method: str,
    case: Case,
    *,
    url: str,
    images: Path,
    rundir: Path,
    logdir: Path,
    label: str,
    virtual_size: int,
    importer: str,
    timeout: float,
) -> tuple[RunResult, Path]:
    """Measure one method on one case; returns the result and the output file to check."""
    if rundir.exists():
        shutil.rmtree(rundir)
    tmp = rundir / "tmp"
    tmp.mkdir(parents=True)
    if method == "ours":
        data, scratch = rundir / "data", rundir / "scratch"
        data.mkdir()
        scratch.mkdir()
        env = _clean_env(
            IMPORTER_SOURCE="http",
            IMPORTER_ENDPOINT=url,
            IMPORTER_IMAGE_SIZE=str(virtual_size),
            FILESYSTEM_OVERHEAD="0",
            CDI_DATA_DIR=str(data),
            CDI_SCRATCH_DIR=str(scratch),
            CDI_TERMINATION_LOG=str(rundir / "termination-log"),
            CDI_METRICS_ADDR="off",
            TMPDIR=str(tmp),
        )
        argv = [importer]
        output = data / "disk.img"
    elif method == "baseline":
        output = rundir / "out.raw"
        filters = [f"--filter={case.compression}"] if case.compression else []
        convert = f'qemu-img convert -W -f {case.fmt} -O raw "$uri" {shlex.quote(str(output))}'
        argv = ["nbdkit", "-r", "-U", "-", *filters, "--run", convert, "curl", f"url={url}"]
        env = _clean_env(TMPDIR=str(tmp))
    else:
        output = rundir / "out.raw"
        source = str(images / case.file)
        if case.compression is None:
            argv = ["qemu-img", "convert", "-W", "-f", case.fmt, "-O", "raw", source, str(output)]
        else:
            script = (
                f'set -o pipefail; {case.compression} -dc -- "$1"'
                ' | dd of="$2" bs=1M iflag=fullblock conv=sparse status=none'
            )
            argv = ["bash", "-c", script, "floor", source, str(output)]
        env = _clean_env(TMPDIR=str(tmp))
    os.sync()  # earlier runs' dirty pages are not written back during this one
    result = measure(label, argv, logdir=logdir, timeout=timeout, env=env, cwd=rundir)
    return result, output


def run_case(
    case: Case,
    server: NginxServer,
    *,
    images: Path,
    work: Path,
    repeat: int,
    methods: Sequence[str],
    importer: str,
    timeout: float,
) -> CaseResult:
    reference = images / case.reference
    result = CaseResult(case, reference.stat().st_size, (images / case.file).stat().st_size)
    slug = case.name.replace(" ", "-")
    for i in range(repeat):
        order = list(methods) if i % 2 == 0 else list(reversed(methods))
        for method in order:
            label = f"{slug}-{method}-{i + 1}"
            rundir = work / "runs" / label
            run, output = run_one(
                method,
                case,
                url=server.url(case.file),
                images=images,
                rundir=rundir,
                logdir=work / "logs",
                label=label,
                virtual_size=result.virtual_size,
                importer=importer,
                timeout=timeout,
            )
            if run.ok:
                diff = sparse_diff(reference, output)
                if diff is not None:
                    run.error = f"wrong output: {diff}"
            shutil.rmtree(rundir, ignore_errors=True)
            result.runs[method].append(run)
            status = "ok" if run.ok else f"ERROR {run.error}"
            log(
                f"  {label:28} {run.wall_s:7.2f} s  cpu {run.cpu_s:6.2f} s"
                f"  main {run.main_peak_rss / MIB:6.1f} MiB  tree {run.tree_peak_rss / MIB:6.1f}"
                f" MiB  {status}"
            )
    return result


# --------------------------------------------------------------------------------------------------
# report


def _mib(value: int | None) -> str:
    return fmt(None if value is None else value / MIB, ".1f")


def _bm(result: CaseResult, method: str) -> str:
    b, m = result.best(method), result.median(method)
    if b is None:
        return "ERR" if result.runs[method] else "-"
    return f"{b:.2f}/{m:.2f}"


def _ratio(value: float | None) -> str:
    return fmt(value, ".2f") + ("x" if value is not None else "")


def main_table(results: Sequence[CaseResult]) -> str:
    headers = [
        "image",
        "ours s",
        "baseline s",
        "floor s",
        "floor tool",
        "ours/base",
        "ours/floor",
        "ours RSS",
        "ours tree",
        "base tree",
    ]
    rows = [
        [
            r.case.name,
            _bm(r, "ours"),
            _bm(r, "baseline"),
            _bm(r, "floor"),
            r.case.floor_label,
            _ratio(r.ratio("ours", "baseline")),
            _ratio(r.ratio("ours", "floor")),
            _mib(r.importer_peak()),
            _mib(r.peak("ours", "tree_peak_rss")),
            _mib(r.peak("baseline", "tree_peak_rss")),
        ]
        for r in results
    ]
    return table(headers, rows)


def detail_table(results: Sequence[CaseResult]) -> str:
    headers = ["image", "method", "runs", "best s", "median s", "MB/s", "cpu s", "main", "tree"]
    rows = []
    for r in results:
        for method in METHODS:
            runs = r.runs[method]
            if not runs:
                continue
            ok = [x for x in runs if x.ok]
            b = r.best(method)
            cpu = min((x.cpu_s for x in ok), default=None)
            rows.append(
                [
                    r.case.name,
                    method,
                    f"{len(ok)}/{len(runs)}",
                    fmt(b),
                    fmt(r.median(method)),
                    fmt(r.virtual_size / b / 1e6 if b else None, ".0f"),
                    fmt(cpu),
                    _mib(r.peak(method, "main_peak_rss")),
                    _mib(r.peak(method, "tree_peak_rss")),
                ]
            )
    return table(headers, rows)


def check_targets(results: Sequence[CaseResult]) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []
    for r in results:
        if r.case.target_ratio is None or not r.runs["ours"]:
            continue
        value = r.ratio("ours", "baseline")
        checks.append(
            {
                "target": f"{r.case.name}: ours <= {r.case.target_ratio}x baseline",
                "value": value,
                "median_value": r.ratio("ours", "baseline", "median"),
                "limit": r.case.target_ratio,
                "pass": value is not None and value <= r.case.target_ratio,
            }
        )
    for r in results:
        if not r.runs["ours"]:
            continue
        peak = r.importer_peak()
        checks.append(
            {
                "target": f"{r.case.name}: importer peak RSS <= {RSS_TARGET // MIB} MiB",
                "value": None if peak is None else peak / MIB,
                "median_value": None,
                "limit": RSS_TARGET / MIB,
                "pass": peak is not None and peak <= RSS_TARGET,
            }
        )
    return checks


def targets_text(checks: Sequence[dict[str, Any]]) -> str:
    lines = []
    for c in checks:
        verdict = "PASS" if c["pass"] else "MISS"
        if c["value"] is None:
            shown = "no successful run of ours"
        elif "RSS" in c["target"]:
            shown = f"{c['value']:.1f} MiB"
        else:
            shown = f"{c['value']:.2f}x (median {fmt(c['median_value'])}x)"
        lines.append(f"  {verdict}  {c['target']:48} {shown}")
    return "\n".join(lines)


def to_json(
    results: Sequence[CaseResult],
    checks: Sequence[dict[str, Any]],
    meta: dict[str, Any],
) -> dict[str, Any]:
    cases = []
    for r in results:
        methods: dict[str, Any] = {}
        for method in METHODS:
            if not r.runs[method]:
                continue
            methods[method] = {
                "best_s": r.best(method),
                "median_s": r.median(method),
                "peak_main_rss_mib": _none_div(r.peak(method, "main_peak_rss"), MIB),
                "peak_tree_rss_mib": _none_div(r.peak(method, "tree_peak_rss"), MIB),
                "runs": [asdict(x) for x in r.runs[method]],
            }
        cases.append(
            {
                "image": r.case.name,
                "file": r.case.file,
                "format": r.case.fmt,
                "compression": r.case.compression,
                "floor": r.case.floor_label,
                "virtual_size": r.virtual_size,
                "served_bytes": r.served_bytes,
                "importer_peak_rss_mib": _none_div(r.importer_peak(), MIB),
                "ours_over_baseline": r.ratio("ours", "baseline"),
                "ours_over_baseline_median": r.ratio("ours", "baseline", "median"),
                "ours_over_floor": r.ratio("ours", "floor"),
                "ours_over_floor_median": r.ratio("ours", "floor", "median"),
                "methods": methods,
            }
        )
    return {**meta, "cases": cases, "targets": list(checks)}


def _none_div(value: int | None, by: int) -> float | None:
    return None if value is None else value / by


# --------------------------------------------------------------------------------------------------
# entry point


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="import_bench.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="256 MiB virtual / 128 MiB data")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    parser.add_argument("--repeat", type=int, default=2, help="runs per measurement [2]")
    parser.add_argument(
        "--only", default="", help="comma-separated image names (qcow2,raw,raw.gz,raw.xz,sparse)"
    )
    parser.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated subset of ours,baseline,floor"
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run [900]")
    parser.add_argument(
        "--workdir", type=Path, help="use (and keep) this dir; images in it are reused"
    )
    parser.add_argument(
        "--importer",
        default=str(Path(sys.executable).parent / "cdi-importer"),
        help="the cdi-importer executable [next to this python]",
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods: {', '.join(sorted(unknown))}")
    return args


def _selected(only: str) -> list[Case]:
    if not only:
        return list(CASES)
    names = {n.strip() for n in only.split(",") if n.strip()}
    return [c for c in CASES if c.name in names or ("sparse" in names and "sparse" in c.name)]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = Sizes.for_mode(args.quick)
    cases = _selected(args.only)
    if not cases:
        log(f"no image matches --only {args.only}")
        return 2
    if "ours" in args.methods and not os.access(args.importer, os.X_OK):
        log(f"importer not found: {args.importer}")
        return 2
    keep = args.keep or args.workdir is not None
    if args.workdir is not None:
        work = args.workdir.resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        work = Path(tempfile.mkdtemp(prefix="cdi-import-bench-", dir="/var/tmp"))
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    results: list[CaseResult] = []
    build_s: dict[str, float] = {}
    failed = False
    try:
        log(f"work dir {work}")
        images = work / "images"
        build_s = build_images(images, sizes)
        shutil.rmtree(work / "runs", ignore_errors=True)
        with NginxServer(images, work / "nginx", probe="disk.raw") as server:
            log(f"nginx on 127.0.0.1:{server.port}")
            for case in cases:
                log(f"{case.name}:")
                results.append(
                    run_case(
                        case,
                        server,
                        images=images,
                        work=work,
                        repeat=args.repeat,
                        methods=args.methods,
                        importer=args.importer,
                        timeout=args.timeout,
                    )
                )
    except Exception as err:
        log(f"benchmark error: {type(err).__name__}: {err}")
        failed = True
    finally:
        if keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if not results:
        return 1
    checks = check_targets(results)
    errors = [e for r in results for e in r.errors()]
    mode = "quick" if args.quick else "full"
    print(
        f"\nimport benchmark ({mode}: {sizes.virtual // MIB} MiB virtual, {sizes.data // MIB} MiB"
        f" random data; sparse case {sizes.sparse_virtual // GIB} GiB virtual,"
        f" {4 * sizes.sparse_chunk // MIB} MiB data; best/median of {args.repeat} runs;"
        " ratios of best times; RSS in MiB, max over runs)"
    )
    print(main_table(results))
    print("\nper method (MB/s of virtual size; main = the measured command's own process):")
    print(detail_table(results))
    print("\ntargets:")
    print(targets_text(checks) or "  (ours not measured)")
    if errors:
        print("\nerrors:")
        print("\n".join(f"  {e}" for e in errors))
    meta = {
        "benchmark": "import",
        "timestamp": started,
        "mode": mode,
        "repeat": args.repeat,
        "sizes": asdict(sizes),
        "build_seconds": build_s,
        "host": {
            "cpus": os.cpu_count(),
            "kernel": os.uname().release,
            "python": sys.version.split()[0],
            "qemu-img": tool_version(["qemu-img", "--version"]),
            "nbdkit": tool_version(["nbdkit", "--version"]),
            "nginx": tool_version(["nginx", "-v"]),
        },
        "errors": errors,
    }
    OUT_DIR.mkdir(exist_ok=True)
    out = OUT_DIR / f"import-{started}.json"
    out.write_text(json.dumps(to_json(results, checks, meta), indent=2) + "\n")
    print(f"\nwrote {out.relative_to(REPO)}")
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
