"""Similar-case retrieval over the state DB (SQLite in a temp dir): ranking, exclusion of the
query's study and of other models, the API (search, ground truth) and its audit rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from dicom_node import similar
from dicom_node.api import create_api
from dicom_node.db import Job, Result, Series, StateDB, Study
from dicom_node.settings import Settings

KEY = similar.model_key("busi_test", "ab" * 32)
OTHER_KEY = similar.model_key("busi_test", "cd" * 32)


def _unit(*values: float) -> np.ndarray:
    vector = np.zeros(8, dtype=np.float32)
    vector[: len(values)] = values
    return vector


def _case(db: StateDB, n: int, label: str, embeddings: list[np.ndarray], key: str = KEY) -> int:
    """A study with one series, job and result, and its images' embeddings; the result id."""
    study = f"1.2.826.0.1.3680043.8.498.9.{n}"
    with db.session() as session:
        session.add(Study(study_instance_uid=study))
        session.flush()
        session.add(Series(series_instance_uid=f"{study}.1", study_instance_uid=study,
                           modality="US", state="complete"))
        session.flush()
        job = Job(series_instance_uid=f"{study}.1", state="done")
        session.add(job)
        session.flush()
        result = Result(
            job_id=job.id, series_instance_uid=f"{study}.1", study_instance_uid=study,
            modality="US", label=label, probability=0.9, probabilities={label: 0.9},
            model_name="busi_test", model_version="1", model_sha256="ab" * 32,
            sr_sop_instance_uid=f"{study}.9", files={"png": ["x.png"] * len(embeddings)},
        )
        session.add(result)
        session.flush()
        session.add_all(similar.embedding_rows(
            result_id=result.id, study_instance_uid=study, series_instance_uid=f"{study}.1",
            images=[(i, f"{study}.1.{i}", label, e) for i, e in enumerate(embeddings, start=1)],
            key=key,
        ))
        return result.id


@pytest.fixture
def db(tmp_path: Path) -> StateDB:
    return StateDB(f"sqlite:///{tmp_path / 'state.db'}")


def test_rank_keeps_one_hit_per_case_nearest_first() -> None:
    candidates = np.stack([similar.normalised(v) for v in
                           (_unit(1, 0), _unit(0.9, 0.1), _unit(0, 1), _unit(0.5, 0.5))])
    ranked = similar.rank(similar.normalised(_unit(1, 0)), candidates, ["a", "a", "b", "c"], 5)
    assert [i for i, _ in ranked] == [0, 3, 2]  # row 1 is case "a" again
    distances = [d for _, d in ranked]
    assert distances == sorted(distances) and distances[0] == pytest.approx(0.0, abs=1e-6)
    # every row its own case: the two nearest rows
    assert [i for i, _ in similar.rank(similar.normalised(_unit(1, 0)), candidates,
                                       ["a", "b", "c", "d"], 2)] == [0, 1]
    with pytest.raises(ValueError, match="dimensions"):
        similar.rank(np.ones(3, dtype=np.float32), candidates, ["a"] * 4, 1)


@pytest.mark.parametrize("bad", [np.zeros(4), np.array([1.0, np.nan]), np.array([])])
def test_unusable_embeddings_are_refused(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        similar.normalised(bad)


def test_nearest_excludes_the_query_study_and_other_models(db: StateDB) -> None:
    query = _case(db, 1, "malignant", [_unit(1, 0.1)])
    near = _case(db, 2, "malignant", [_unit(1, 0.2), _unit(0, 1)])
    far = _case(db, 3, "normal", [_unit(0.1, 1)])
    _case(db, 4, "benign", [_unit(1, 0.1)], key=OTHER_KEY)  # identical vector, other weights
    found = similar.similar_to_result(db, query, k=5)
    assert [n.result_id for n in found] == [near, far]
    assert found[0].image_index == 1 and found[0].label == "malignant"
    assert 0 <= found[0].distance < found[1].distance
    assert [n.result_id for n in similar.similar_to_result(db, query, k=1)] == [near]
    with pytest.raises(similar.NoEmbeddings):
        similar.similar_to_result(db, 999)


def test_api_search_ground_truth_and_audit(db: StateDB, tmp_path: Path) -> None:
    query = _case(db, 1, "malignant", [_unit(1, 0.1)])
    past = _case(db, 2, "benign", [_unit(1, 0.3)])
    client = TestClient(create_api(Settings(data_dir=tmp_path), db))
    body = client.get(f"/results/{query}/similar", params={"k": 3}).json()
    [item] = body["items"]
    assert item["result_id"] == past and item["ground_truth"] is None
    assert item["thumbnail"] == f"/results/{past}/heatmap.png?index=1"
    assert item["image"].startswith("/instances/") and item["image"].endswith("/image.png")

    assert client.put(f"/results/{past}/ground-truth", json={"label": "malignant"}).json() \
        == {"result_id": past, "ground_truth": "malignant", "images": 1}
    [item] = client.get(f"/results/{query}/similar").json()["items"]
    assert item["ground_truth"] == "malignant" and item["label"] == "benign"

    assert client.put("/results/999/ground-truth", json={"label": "benign"}).status_code == 404
    assert client.put(f"/results/{past}/ground-truth",
                      json={"label": "Bad Label!"}).status_code == 422
    assert client.get("/results/999/similar").status_code == 404
    assert client.get(f"/results/{query}/similar", params={"k": 0}).status_code == 422
    puts = client.get("/audit", params={"action": "api-put"}).json()["items"]
    assert [(e["ok"], e["detail"]["status"]) for e in puts] == [(False, 422), (False, 404),
                                                                (True, 200)]


def test_a_superseded_result_is_not_a_past_case(db: StateDB) -> None:
    query = _case(db, 1, "malignant", [_unit(1, 0.1)])
    old = _case(db, 2, "benign", [_unit(1, 0.1)])  # nearest, but superseded below
    far = _case(db, 3, "normal", [_unit(0.2, 1)])
    with db.session() as session:
        successor = session.get(Result, far)
        assert successor is not None
        successor.predecessor_id = old
    assert [n.result_id for n in similar.similar_to_result(db, query)] == [far]
