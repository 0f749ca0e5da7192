"""The listener and the store over real associations on localhost (pynetdicom SCU as the peer)."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select
from support.dicom_factory import US_IMAGE_STORAGE, busi_as_ultrasound, write_dataset
from support.ports import free_port

from dicom_node.db import Instance, Series, StateDB
from dicom_node.scp import StorageSCP
from dicom_node.settings import Settings
from dicom_node.store import InstanceStore


class FullDiskStore(InstanceStore):
    """A store whose file writes fail with ENOSPC after writing part of the file.

    Stands in for a full disk, which cannot be produced here without mounting a filesystem;
    everything else (association, status, DB) is real.
    """

    def _write_file(self, path: Path, data: bytes) -> None:
        with open(path, "wb") as handle:
            handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")


def _png(tmp_path: Path, name: str = "img.png", seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    grey = rng.integers(0, 255, (64, 80), dtype=np.uint8)
    path = tmp_path / name
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(path)
    return path


def _us_dataset(tmp_path: Path, seed: int = 0) -> Dataset:
    return busi_as_ultrasound(_png(tmp_path, f"img{seed}.png", seed), patient_id="P1")


class Node:
    def __init__(
        self, tmp_path: Path, store_cls: type[InstanceStore] = InstanceStore, **kw: object
    ):
        self.settings = Settings(
            data_dir=tmp_path / "var",
            dicom_host="127.0.0.1",
            dicom_port=free_port(),
            **kw,  # type: ignore[arg-type]
        )
        self.db = StateDB(self.settings.sqlalchemy_url)
        self.store = store_cls(self.settings.store_dir, self.db)
        self.scp = StorageSCP(self.settings, self.store)

    def files(self) -> list[Path]:
        return sorted(p for p in self.settings.store_dir.rglob("*") if p.is_file())

    def instance_count(self) -> int:
        with self.db.session() as session:
            return int(session.scalar(select(func.count()).select_from(Instance)) or 0)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path)
    n.scp.start()
    yield n
    n.scp.stop()
    n.db.dispose()


def _send(port: int, *items: Dataset | Path, calling: str = "STORESCU") -> list[int]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(US_IMAGE_STORAGE)
    assoc = ae.associate("127.0.0.1", port, ae_title="BREASTCAD")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(item).Status) for item in items]
    finally:
        assoc.release()


def test_echo(node: Node) -> None:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.settings.dicom_port, ae_title="BREASTCAD")
    assert assoc.is_established
    assert int(assoc.send_c_echo().Status) == 0x0000
    assoc.release()


def test_store_is_durable_and_recorded(node: Node, tmp_path: Path) -> None:
    ds = _us_dataset(tmp_path)
    assert _send(node.settings.dicom_port, ds) == [0x0000]
    files = node.files()
    assert len(files) == 1
    assert files[0].name == f"{ds.SOPInstanceUID}.dcm"
    stored = dcmread(files[0])
    assert stored.SOPInstanceUID == ds.SOPInstanceUID
    assert np.array_equal(stored.pixel_array, ds.pixel_array)
    with node.db.session() as session:
        series = session.get(Series, ds.SeriesInstanceUID)
        assert series is not None and series.calling_ae == "STORESCU"
        assert series.state == "receiving"
    assert node.instance_count() == 1


def test_duplicate_instance_is_stored_once(node: Node, tmp_path: Path) -> None:
    ds = _us_dataset(tmp_path)
    assert _send(node.settings.dicom_port, ds, ds) == [0x0000, 0x0000]
    assert _send(node.settings.dicom_port, ds) == [0x0000]
    assert len(node.files()) == 1
    assert node.instance_count() == 1


def test_pixel_data_shorter_than_rows_columns_is_refused(node: Node, tmp_path: Path) -> None:
    ds = _us_dataset(tmp_path)
    ds.Rows = ds.Rows * 4  # Pixel Data no longer holds Rows x Columns
    statuses = _send(node.settings.dicom_port, ds)
    assert statuses == [0xC002]
    assert node.files() == []
    assert node.instance_count() == 0


def test_missing_study_uid_is_refused(node: Node, tmp_path: Path) -> None:
    ds = _us_dataset(tmp_path)
    del ds.StudyInstanceUID
    assert _send(node.settings.dicom_port, ds) == [0xC001]
    assert node.files() == []


def test_decompression_bomb_is_refused(tmp_path: Path) -> None:
    n = Node(tmp_path, max_frame_pixels=1000)
    n.scp.start()
    try:
        assert _send(n.settings.dicom_port, _us_dataset(tmp_path)) == [0xC003]
        assert n.files() == []
    finally:
        n.scp.stop()


def test_undecodable_dataset_gets_cannot_understand(
    node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = write_dataset(_us_dataset(tmp_path), tmp_path / "good.dcm")
    raw = good.read_bytes()
    ds = dcmread(good)
    meta_end = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    broken = tmp_path / "broken.dcm"
    # valid file meta, then an element whose length runs far past the end of the data
    broken.write_bytes(raw[:meta_end] + b"\x08\x00\x16\x00UI\xff\x7f" + b"1.2" * 10)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    statuses = _send(node.settings.dicom_port, broken)
    assert len(statuses) == 1 and 0xC000 <= statuses[0] <= 0xCFFF
    assert node.files() == []
    # the node goes on serving
    assert _send(node.settings.dicom_port, _us_dataset(tmp_path, seed=2)) == [0x0000]


def test_sop_class_mismatch(node: Node, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = _us_dataset(tmp_path)
    path = write_dataset(ds, tmp_path / "mismatch.dcm")
    stored = dcmread(path)
    stored.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # dataset says SC, file meta says US
    stored.save_as(path, enforce_file_format=False)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    assert _send(node.settings.dicom_port, path) == [0xA900]
    assert node.files() == []


def test_full_disk_answers_out_of_resources_and_leaves_nothing(tmp_path: Path) -> None:
    n = Node(tmp_path, store_cls=FullDiskStore)
    n.scp.start()
    try:
        assert _send(n.settings.dicom_port, _us_dataset(tmp_path)) == [0xA700]
        assert n.files() == []  # no partial file, no temporary file
        assert n.instance_count() == 0
    finally:
        n.scp.stop()


def test_calling_ae_outside_allowed_list_is_rejected(tmp_path: Path) -> None:
    n = Node(tmp_path, allowed_calling_aets=["MODALITY1"])
    n.scp.start()
    try:
        ae = AE(ae_title="STRANGER")
        ae.add_requested_context(US_IMAGE_STORAGE)
        assoc = ae.associate("127.0.0.1", n.settings.dicom_port, ae_title="BREASTCAD")
        assert assoc.is_rejected
        assert _send(n.settings.dicom_port, _us_dataset(tmp_path), calling="MODALITY1") == [0]
    finally:
        n.scp.stop()
