"""Deterministic result UIDs: a retried task produces the same SR and SC identities."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pytest
from pydicom import Dataset

from inference.prediction import Prediction
from reports import ResultObjects, build_results, derive_uid
from reports.uids import source_set

UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def _build(make_source: Callable[..., Dataset], make_prediction: Callable[..., Prediction],
           *, count: int = 2, model: dict[str, str] | None = None) -> ResultObjects:
    sources = [make_source(i + 1) for i in range(count)]
    images = [np.zeros((s.Rows, s.Columns, 3), dtype=np.uint8) for s in sources]
    predictions = [make_prediction(s.Rows, s.Columns, **(model or {})) for s in sources]
    return build_results(sources, images, predictions, series_prediction=predictions[0],
                         software_version="0.1.0")


def _uids(results: ResultObjects) -> list[str]:
    uids = [results.sr.SOPInstanceUID, results.sr.SeriesInstanceUID]
    for sc in results.heatmaps:
        uids += [sc.SOPInstanceUID, sc.SeriesInstanceUID]
    return [str(u) for u in uids]


def test_derive_uid_is_deterministic_and_valid() -> None:
    first = derive_uid("1.2.3", "busi_cnn", "1.0", "abc", "sr-series")
    assert first == derive_uid("1.2.3", "busi_cnn", "1.0", "abc", "sr-series")
    assert first.startswith("2.25.")
    assert len(first) <= 64
    assert UID_PATTERN.match(first)
    assert first != derive_uid("1.2.3", "busi_cnn", "1.0", "abc", "sc-series")


def test_derive_uid_parts_are_not_just_concatenated() -> None:
    assert derive_uid("ab", "c") != derive_uid("a", "bc")
    assert derive_uid("abc") != derive_uid("ab", "c")


def test_derive_uid_needs_string_parts() -> None:
    with pytest.raises(ValueError, match="at least one part"):
        derive_uid()
    with pytest.raises(ValueError, match="must be str"):
        derive_uid("1.2.3", 4)  # type: ignore[arg-type]


def test_building_twice_gives_the_same_uids(make_source: Callable[..., Dataset],
                                            make_prediction: Callable[..., Prediction]) -> None:
    assert _uids(_build(make_source, make_prediction)) == _uids(
        _build(make_source, make_prediction)
    )


def test_uids_follow_the_documented_derivation(make_source: Callable[..., Dataset],
                                               make_prediction: Callable[..., Prediction]) -> None:
    results = _build(make_source, make_prediction)
    source = make_source(1)
    model = ("busi_cnn", "1.0.0", "0123456789abcdef" * 4)
    series = str(source.SeriesInstanceUID)
    instances = source_set([str(make_source(2).SOPInstanceUID), str(source.SOPInstanceUID)])
    assert instances.startswith("sources-sha256=")
    assert results.sr.SeriesInstanceUID == derive_uid(series, *model, instances, "sr-series")
    assert results.sr.SOPInstanceUID == derive_uid(series, *model, instances, "sr-instance")
    assert results.heatmaps[0].SeriesInstanceUID == derive_uid(
        series, *model, instances, "sc-series"
    )
    assert results.heatmaps[0].SOPInstanceUID == derive_uid(
        series, *model, instances, f"sc-instance-{source.SOPInstanceUID}"
    )


def test_source_set_ignores_order_and_duplicates() -> None:
    assert source_set(["1.2.3", "1.2.4"]) == source_set(["1.2.4", "1.2.3", "1.2.3"])
    assert source_set(["1.2.3"]) != source_set(["1.2.3", "1.2.4"])
    with pytest.raises(ValueError, match="at least one"):
        source_set([])


def test_a_series_that_gained_an_instance_gets_new_uids(
    make_source: Callable[..., Dataset], make_prediction: Callable[..., Prediction]
) -> None:
    """A late instance re-opens a series: its new result must not overwrite the old one."""
    before = _uids(_build(make_source, make_prediction, count=1))
    after = _uids(_build(make_source, make_prediction, count=2))
    assert set(before).isdisjoint(after)


@pytest.mark.parametrize("change", [{"model_version": "1.0.1"}, {"model_name": "other_cnn"},
                                    {"model_sha256": "f" * 64}])
def test_another_model_gives_other_uids(make_source: Callable[..., Dataset],
                                        make_prediction: Callable[..., Prediction],
                                        change: dict[str, str]) -> None:
    before = _uids(_build(make_source, make_prediction))
    after = _uids(_build(make_source, make_prediction, model=change))
    assert set(before).isdisjoint(after)


def test_results_are_new_series_of_the_source_study(
    make_source: Callable[..., Dataset], make_prediction: Callable[..., Prediction]
) -> None:
    results = _build(make_source, make_prediction, count=3)
    source = make_source(1)
    objects = [results.sr, *results.heatmaps]
    assert {str(o.StudyInstanceUID) for o in objects} == {source.StudyInstanceUID}
    series = {str(results.sr.SeriesInstanceUID), str(results.heatmaps[0].SeriesInstanceUID)}
    assert len(series) == 2
    assert source.SeriesInstanceUID not in series
    assert len({str(sc.SeriesInstanceUID) for sc in results.heatmaps}) == 1
    sop_uids = [str(o.SOPInstanceUID) for o in objects]
    assert len(set(sop_uids)) == len(sop_uids)
    assert all(UID_PATTERN.match(uid) and len(uid) <= 64 for uid in sop_uids + list(series))
    # Instance numbers follow the sources', series numbers sort the results beside theirs.
    assert [int(sc.InstanceNumber) for sc in results.heatmaps] == [1, 2, 3]
    assert int(results.sr.SeriesNumber) == 7003
    assert int(results.heatmaps[0].SeriesNumber) == 8003


def test_sc_uids_do_not_depend_on_source_order(make_source: Callable[..., Dataset],
                                               make_prediction: Callable[..., Prediction]) -> None:
    sources = [make_source(1), make_source(2)]
    images = [np.zeros((s.Rows, s.Columns, 3), dtype=np.uint8) for s in sources]
    predictions = [make_prediction(s.Rows, s.Columns) for s in sources]
    forward = build_results(sources, images, predictions, series_prediction=predictions[0],
                            software_version="0.1.0")
    backward = build_results(sources[::-1], images[::-1], predictions[::-1],
                             series_prediction=predictions[0], software_version="0.1.0")
    assert {str(sc.SOPInstanceUID) for sc in forward.heatmaps} == {
        str(sc.SOPInstanceUID) for sc in backward.heatmaps
    }
    assert forward.sr.SOPInstanceUID == backward.sr.SOPInstanceUID
