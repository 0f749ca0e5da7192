"""Thin wrappers over dcmtk (storescu, echoscu, dsrdump) and dicom3tools (dciodvfy).

storescu facts (dcmtk 3.6.7, checked here):

- ``-R`` limits the proposal to the SOP classes of the files, but the transfer syntaxes still
  come from the ``-x..`` option (default: uncompressed only). A compressed file needs its own
  flag: ``-xr`` for RLE, ``-xy`` for JPEG baseline, and so on; ``-R`` alone fails on RLE
  ("unable to convert dataset from 'RLE Lossless' transfer syntax to 'Little Endian
  Explicit'"). :func:`storescu` therefore runs one storescu per transfer-syntax group.
- A refused C-STORE (e.g. 0xA700) gives exit code 167 and stops there; with ``-nh`` (no
  halt) the exit code is 0 and the refusal only shows in ``-v`` output as
  ``Received Store Response (Refused: OutOfResources)``. We always pass ``-v`` so
  :func:`store_responses` can read every response.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest

# Transfer syntax UID -> storescu flag proposing it (plus the uncompressed ones); None: the
# default proposal (uncompressed) is enough.
STORESCU_TS_FLAGS: dict[str, str | None] = {
    "1.2.840.10008.1.2": None,  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1": None,  # Explicit VR Little Endian
    "1.2.840.10008.1.2.2": None,  # Explicit VR Big Endian (retired)
    "1.2.840.10008.1.2.1.99": "-xd",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG Baseline (Process 1), 8-bit lossy
    "1.2.840.10008.1.2.4.51": "-xx",  # JPEG Extended (Process 2 & 4), 12-bit lossy
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": "-xt",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "-xu",  # JPEG-LS Near-lossless
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000
    "1.2.840.10008.1.2.4.100": "-xm",  # MPEG2 MP@ML
    "1.2.840.10008.1.2.4.101": "-xh",  # MPEG2 MP@HL
    "1.2.840.10008.1.2.4.102": "-xn",  # MPEG-4 AVC/H.264 HP / Level 4.1
    "1.2.840.10008.1.2.4.103": "-xl",  # MPEG-4 AVC/H.264 BD-compatible
    "1.2.840.10008.1.2.4.104": "-x2",  # MPEG-4 AVC/H.264 HP / Level 4.2 2D
    "1.2.840.10008.1.2.4.105": "-x3",  # MPEG-4 AVC/H.264 HP / Level 4.2 3D
    "1.2.840.10008.1.2.4.106": "-xo",  # MPEG-4 AVC/H.264 Stereo HP / Level 4.2
    "1.2.840.10008.1.2.4.107": "-x4",  # HEVC Main Profile / Level 5.1
    "1.2.840.10008.1.2.4.108": "-x5",  # HEVC Main 10 Profile / Level 5.1
    "1.2.840.10008.1.2.5": "-xr",  # RLE Lossless
}

_EXTRA_SEARCH_PATH = "/usr/bin:/usr/local/bin:/usr/sbin"
_STORE_RESPONSE = re.compile(r"Received Store Response(?: \(([^)]*)\))?")


def find_tool(name: str) -> str | None:
    """Absolute path of a command-line tool, or None."""
    search = os.environ.get("PATH", "") + os.pathsep + _EXTRA_SEARCH_PATH
    return shutil.which(name, path=search)


def require_tool(name: str) -> str:
    """The tool's path; ``pytest.skip`` with the reason when it is not installed."""
    path = find_tool(name)
    if path is None:
        package = "dicom3tools" if name == "dciodvfy" else "dcmtk"
        pytest.skip(f"{name} is not installed (apt-get install -y {package})")
    return path


def _tool(name: str) -> str:
    path = find_tool(name)
    if path is None:
        raise FileNotFoundError(f"{name} not found on PATH")
    return path


def transfer_syntax_of(path: Path) -> str:
    """The TransferSyntaxUID in a Part 10 file's meta header."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ts = ds.file_meta.get("TransferSyntaxUID")
    if not ts:
        raise ValueError(f"{path}: no TransferSyntaxUID in the file meta information")
    return str(ts)


def group_by_transfer_syntax(files: Iterable[str | Path]) -> dict[str, list[Path]]:
    """Files grouped by transfer syntax, groups and files in first-seen order."""
    groups: dict[str, list[Path]] = {}
    for f in files:
        path = Path(f)
        groups.setdefault(transfer_syntax_of(path), []).append(path)
    return groups


def storescu(
    files: Iterable[str | Path],
    host: str,
    port: int,
    *,
    calling_aet: str = "STORESCU",
    called_aet: str = "BREASTCAD",
    timeout: float = 120,
    no_halt: bool = False,
    extra_args: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Send files with dcmtk ``storescu -v -R`` proposing exactly each file's transfer syntax.

    One storescu run (one association) per transfer-syntax group, with the flag from
    :data:`STORESCU_TS_FLAGS`. The result merges the runs: ``args`` is the list of command
    lines, ``returncode`` the first non-zero one (0 if all succeeded), ``stdout``/``stderr``
    concatenated. Without ``no_halt`` the runs stop at the first failing group, as storescu
    stops at the first failing file. ``timeout`` (seconds) applies to each run and raises
    ``subprocess.TimeoutExpired``. Raises ValueError for a transfer syntax storescu cannot
    propose from its command line.
    """
    exe = _tool("storescu")
    groups = group_by_transfer_syntax(files)
    if not groups:
        raise ValueError("storescu: no files given")
    unknown = sorted(ts for ts in groups if ts not in STORESCU_TS_FLAGS)
    if unknown:
        raise ValueError(f"storescu: no command-line flag proposes transfer syntax(es) {unknown}")
    commands: list[list[str]] = []
    stdout: list[str] = []
    stderr: list[str] = []
    returncode = 0
    for ts, paths in groups.items():
        cmd = [exe, "-v", "-R", "-aet", calling_aet, "-aec", called_aet]
        flag = STORESCU_TS_FLAGS[ts]
        if flag is not None:
            cmd.append(flag)
        if no_halt:
            cmd.append("-nh")
        cmd.extend(extra_args)
        cmd.extend([host, str(port)])
        cmd.extend(str(p) for p in paths)
        commands.append(cmd)
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        stdout.append(done.stdout)
        stderr.append(done.stderr)
        if done.returncode != 0 and returncode == 0:
            returncode = done.returncode
            if not no_halt:
                break
    # CompletedProcess.args is typed as one command line; here it is the list of them.
    args: Any = commands
    return subprocess.CompletedProcess(args, returncode, "".join(stdout), "".join(stderr))


def store_responses(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The status text of every C-STORE response in a :func:`storescu` run's ``-v`` output.

    E.g. ``["Success", "Refused: OutOfResources"]``; dcmtk logs to stderr, both are read.
    """
    text = f"{result.stdout}\n{result.stderr}"
    return [m.group(1) or "" for m in _STORE_RESPONSE.finditer(text)]


def echoscu(
    host: str,
    port: int,
    *,
    calling_aet: str = "ECHOSCU",
    called_aet: str = "BREASTCAD",
    timeout: float = 30,
) -> subprocess.CompletedProcess[str]:
    """C-ECHO with dcmtk ``echoscu``; returncode 0 means the peer answered success."""
    cmd = [_tool("echoscu"), "-aet", calling_aet, "-aec", called_aet, host, str(port)]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def dsrdump(path: str | Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Render an SR as text with dcmtk ``dsrdump`` (extra options in ``args``)."""
    cmd = [_tool("dsrdump"), *args, str(path)]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


@dataclass(frozen=True)
class DciodvfyResult:
    """dciodvfy's verdict: its ``Error``/``Warning`` lines and the full output."""

    errors: list[str]
    warnings: list[str]
    output: str

    @property
    def ok(self) -> bool:
        """No Error lines (warnings allowed)."""
        return not self.errors


def parse_dciodvfy(output: str) -> DciodvfyResult:
    """Split dciodvfy output into Error and Warning lines (the exit code is not reliable)."""
    errors: list[str] = []
    warnings: list[str] = []
    for line in output.splitlines():
        stripped = line.strip()
        if stripped.startswith("Error"):
            errors.append(stripped)
        elif stripped.startswith("Warning"):
            warnings.append(stripped)
    return DciodvfyResult(errors=errors, warnings=warnings, output=output)


def dciodvfy(path: str | Path, *, timeout: float = 120) -> DciodvfyResult:
    """Run dicom3tools ``dciodvfy`` on a file and parse its Error/Warning lines."""
    done = subprocess.run(
        [_tool("dciodvfy"), str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    return parse_dciodvfy(done.stdout + done.stderr)
