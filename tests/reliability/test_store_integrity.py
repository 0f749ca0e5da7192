"""The store under a full disk, and after a listener was killed mid-write.

The full disk is real: a 2 MiB tmpfs mounted as ``data_dir/instances`` (needs root and a
sandbox that permits ``mount``; skipped with the reason otherwise). The state DB stays on the
ordinary disk, as it would on a node whose image volume filled up.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from rel_support import InProcessNode, make_series, send_datasets
from support.shared_data import busi_png_paths

from dicom_node.validation import STATUS_OUT_OF_RESOURCES, STATUS_SUCCESS


def _mount(args: list[str]) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("mount")
    if exe is None:
        pytest.skip("no mount command")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """``tmp_path/var/instances`` on a 2 MiB tmpfs; unmounted afterwards."""
    target = tmp_path / "var" / "instances"
    target.mkdir(parents=True)
    mounted = _mount(["-t", "tmpfs", "-o", "size=2m", "tmpfs", str(target)])
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {mounted.stderr}")
    try:
        yield target
    finally:
        umount = shutil.which("umount") or "umount"
        subprocess.run([umount, "-l", str(target)], capture_output=True, timeout=30)


def test_full_disk_answers_a700_leaves_nothing_half_written_and_recovers(
    shared_data: Path, small_disk: Path, tmp_path: Path
) -> None:
    files = make_series(busi_png_paths(shared_data, "benign")[:45], tmp_path / "src")
    node = InProcessNode(tmp_path / "var")
    node.start()
    try:
        statuses = send_datasets(node.port, files)
        accepted = [f for f, s in zip(files, statuses, strict=True) if s == STATUS_SUCCESS]
        refused = [f for f, s in zip(files, statuses, strict=True) if s != STATUS_SUCCESS]
        # about 66 KB each: a 2 MiB disk takes some, then every further one is out of resources
        assert accepted and refused, statuses
        assert set(statuses) == {STATUS_SUCCESS, STATUS_OUT_OF_RESOURCES}, statuses
        first_refusal = statuses.index(STATUS_OUT_OF_RESOURCES)
        assert all(s == STATUS_OUT_OF_RESOURCES for s in statuses[first_refusal:])

        rows = node.rows()
        sop_of = {f: str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
        assert set(rows) == {sop_of[f] for f in accepted}
        assert node.stored_files() == set(rows.values())  # no file without a row
        assert node.incoming_files() == []  # no temporary left over
        for relative in rows.values():
            dcmread(node.settings.store_dir / relative)  # whole files only
        print(f"disk full after {len(accepted)} of {len(files)} instances")

        # space returns: the node stores again without a restart
        assert _mount(["-o", "remount,size=16m", str(small_disk)]).returncode == 0
        assert send_datasets(node.port, refused) == [STATUS_SUCCESS] * len(refused)
        assert set(node.rows()) == set(sop_of.values())
        assert node.stored_files() == set(node.rows().values())
    finally:
        node.stop()


def test_listener_start_removes_half_written_files(shared_data: Path, tmp_path: Path) -> None:
    """What a SIGKILL mid-write leaves (a temporary file) is removed before serving again."""
    node = InProcessNode(tmp_path / "var")
    leftover = node.settings.store_dir / ".incoming" / "1.2.3.dcm.0a1b2c3d.tmp"
    leftover.write_bytes(b"DICM" + b"\0" * 100)
    node.start()
    try:
        assert node.incoming_files() == []
        [file] = make_series(busi_png_paths(shared_data, "normal")[:1], tmp_path / "src")
        assert send_datasets(node.port, [file]) == [STATUS_SUCCESS]
        assert len(node.stored_files()) == 1 and node.incoming_files() == []
    finally:
        node.stop()
