"""The heatmap as a FRACTIONAL DICOM Segmentation: valid for dciodvfy, the heatmap's values,
deterministic UIDs, clear refusals."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom import Dataset
from results_inputs import display_image, prediction, us_source
from support.dcmtk import dciodvfy, require_tool

from reports import ResultObjects, build_results
from reports.results import SEG_SERIES_NUMBER_OFFSET
from reports.seg import SEG_SERIES_DESCRIPTION


def _build(sources: list[Dataset]) -> ResultObjects:
    return build_results(
        sources, [display_image(s) for s in sources], [prediction() for _ in sources],
        series_prediction=prediction(), software_version="1.0", with_seg=True,
    )


def test_seg_is_valid_and_holds_the_heatmap(tmp_path: Path) -> None:
    require_tool("dciodvfy")
    sources = [us_source(1), us_source(2)]
    objects = _build(sources)
    assert len(objects.segmentations) == 2
    for source, seg in zip(sources, objects.segmentations, strict=True):
        path = tmp_path / f"seg-{source.InstanceNumber}.dcm"
        seg.save_as(path, enforce_file_format=True)
        verdict = dciodvfy(path)
        assert not verdict.errors, verdict.output
        # the only warning: dciodvfy does not know our (declared) private coding scheme
        assert all("99BCAD" in w for w in verdict.warnings), verdict.warnings
        read = hd.seg.segread(path)
        assert read.SegmentationType == "FRACTIONAL"
        assert read.SegmentationFractionalType == "PROBABILITY"
        assert read.SeriesDescription == SEG_SERIES_DESCRIPTION
        assert read.SeriesNumber == SEG_SERIES_NUMBER_OFFSET + 2
        assert read.StudyInstanceUID == source.StudyInstanceUID
        assert read.PatientID == source.PatientID
        assert read.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]\
            .ReferencedSOPInstanceUID == source.SOPInstanceUID
        segment = read.SegmentSequence[0]
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "ATTNMAP"
        assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "busi_test"
        pixels = read.pixel_array.reshape(source.Rows, source.Columns).astype(np.float32) / 255
        expected = prediction().heatmap
        assert np.abs(pixels - expected).max() <= 1 / 255 + 1e-6
        assert pixels.argmax() == expected.argmax()


def test_seg_uids_are_deterministic_and_change_with_the_sources() -> None:
    one = _build([us_source(1)])
    again = _build([us_source(1)])
    more = _build([us_source(1), us_source(2)])
    uid = one.segmentations[0].SOPInstanceUID
    assert again.segmentations[0].SOPInstanceUID == uid
    assert more.segmentations[0].SOPInstanceUID != uid
    assert one.segmentations[0].SeriesInstanceUID not in {
        one.sr.SeriesInstanceUID, one.heatmaps[0].SeriesInstanceUID
    }


def test_no_seg_unless_asked() -> None:
    source = us_source()
    objects = build_results(
        [source], [display_image(source)], [prediction()],
        series_prediction=prediction(), software_version="1.0",
    )
    assert objects.segmentations == []


def test_seg_of_a_slide_is_refused() -> None:
    from reports.seg import build_heatmap_seg

    source = us_source()
    source.Modality = "SM"
    with pytest.raises(ValueError, match="slide"):
        build_heatmap_seg(source, prediction(), series_instance_uid="1.2.3", series_number=1,
                          sop_instance_uid="1.2.3.4", instance_number=1, manufacturer="x",
                          software_version="1")


def test_seg_of_a_heatmap_of_another_size_is_refused() -> None:
    from reports.seg import build_heatmap_seg

    with pytest.raises(ValueError, match="Rows x Columns"):
        build_heatmap_seg(us_source(), prediction(32, 40), series_instance_uid="1.2.3",
                          series_number=1, sop_instance_uid="1.2.3.4", instance_number=1,
                          manufacturer="x", software_version="1")


@pytest.mark.parametrize("sample", ["MG/cbis-ddsm_P_00820_RIGHT_CC_malignant.dcm",
                                    "US/US1_UNCR.dcm", "US/examples_palette.dcm"])
def test_seg_of_real_samples_passes_dciodvfy_without_names_in_warnings(
    shared_data: Path, tmp_path: Path, sample: str, recwarn: pytest.WarningsRecorder
) -> None:
    require_tool("dciodvfy")
    from pydicom import dcmread

    from reports.seg import build_heatmap_seg

    path = shared_data / "dicom-samples" / sample
    if not path.is_file():
        pytest.skip(f"sample {sample} is not in the shared data")
    source = dcmread(path)
    name = str(source.PatientName)
    seg = build_heatmap_seg(
        source, prediction(int(source.Rows), int(source.Columns)),
        series_instance_uid="1.2.826.0.1.3680043.8.498.5.1", series_number=9001,
        sop_instance_uid="1.2.826.0.1.3680043.8.498.5.2", instance_number=1,
        manufacturer="breastcad", software_version="1",
    )
    assert str(source.PatientName) == name  # the source is not changed
    assert str(seg.PatientName) == name  # copied verbatim
    assert not [w for w in recwarn if name and name in str(w.message)]
    out = tmp_path / "seg.dcm"
    seg.save_as(out, enforce_file_format=True)
    verdict = dciodvfy(out)
    assert not verdict.errors, verdict.output


def test_multi_frame_sources_get_no_seg_but_the_rest(shared_data: Path) -> None:
    from pydicom import dcmread

    path = shared_data / "dicom-samples" / "US" / "OBXXXX1A_rle_2frame.dcm"
    if not path.is_file():
        pytest.skip("multi-frame sample not in the shared data")
    from inference import image_from_dataset

    source = dcmread(path)
    image = image_from_dataset(source, frame=0)
    p = prediction(int(source.Rows), int(source.Columns))
    objects = build_results([source], [image], [p], series_prediction=p,
                            software_version="1", with_seg=True)
    assert objects.segmentations == []
    assert len(objects.heatmaps) == 1
