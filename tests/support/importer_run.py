"""Run the real `cdi-importer` as a subprocess with CDI's env contract, in a sandbox of dirs.

The sandbox has `vol/` (data dir), `scratch/`, `term` (termination log); `entries()` lists what
exists under it so tests can prove nothing was written outside the target.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMPORTER_TIMEOUT = 90.0


@dataclass
class ImporterResult:
    returncode: int
    stdout: str
    stderr: str
    termination: str

    @property
    def message(self) -> dict[str, Any]:
        assert self.returncode == 0, self.stderr
        doc: dict[str, Any] = json.loads(self.termination)
        return doc


class Sandbox:
    def __init__(self, root: Path, *, scratch: bool = True) -> None:
        self.root = root
        self.vol = root / "vol"
        self.scratch = root / "scratch"
        self.term = root / "term"
        self.vol.mkdir(parents=True)
        if scratch:
            self.scratch.mkdir()

    @property
    def disk(self) -> Path:
        return self.vol / "disk.img"

    def entries(self) -> set[str]:
        return {str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.name != "term"}

    def run(self, **env: str) -> ImporterResult:
        full = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/root"),
            "CDI_DATA_DIR": str(self.vol),
            "CDI_SCRATCH_DIR": str(self.scratch),
            "CDI_TERMINATION_LOG": str(self.term),
            "CDI_BLOCK_DEVICE": str(self.root / "no-block-device"),
            "CDI_EXTRA_HEADERS_DIR": str(self.root / "no-extra-headers"),
            "CDI_METRICS_ADDR": "off",
            "CDI_LOG_LEVEL": "DEBUG",
            **env,
        }
        proc = subprocess.run(
            [sys.executable, "-m", "importer"],
            env=full,
            capture_output=True,
            text=True,
            timeout=IMPORTER_TIMEOUT,
            check=False,
        )
        term = self.term.read_text() if self.term.exists() else ""
        return ImporterResult(proc.returncode, proc.stdout, proc.stderr, term)
