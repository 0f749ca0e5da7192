"""Similar cases: every analysed image's embedding in the state DB, searched by cosine distance.

The embedding is the classifier's penultimate-layer feature vector (``Prediction.embedding``),
L2-normalised and stored as float32 bytes in ``case_embeddings``. A search loads the embeddings of
the same model (name and weights sha256: vectors of different weights are not comparable) and
ranks them by cosine distance with numpy. At a node's scale (thousands of images, 256 floats
each) a brute-force scan takes milliseconds; an approximate index (faiss, usearch) would only pay
off far beyond that.

A "case" is a study: a search returns each study once (its nearest image) and never the study of
the query itself; a superseded result (one that another result names as its predecessor) is left
out for its successor.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field
from sqlalchemy import select, update

from dicom_node.db import CaseEmbedding, Result, StateDB

EMBEDDING_DTYPE = np.dtype("<f4")


@dataclass(frozen=True)
class Neighbour:
    """One similar past case: its nearest image and that image's cosine distance to the query."""

    result_id: int
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    image_index: int
    label: str
    ground_truth: str | None
    distance: float

    def to_json(self) -> dict[str, object]:
        return {
            "result_id": self.result_id,
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "sop_instance_uid": self.sop_instance_uid,
            "label": self.label,
            "ground_truth": self.ground_truth,
            "distance": round(self.distance, 6),
            "thumbnail": f"/results/{self.result_id}/heatmap.png?index={self.image_index}",
            "image": f"/instances/{self.sop_instance_uid}/image.png",
        }


def model_key(model_name: str, model_sha256: str) -> str:
    """What makes two embeddings comparable: the same network with the same weights."""
    return f"{model_name}@{model_sha256}"


def normalised(vector: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """``vector`` as a 1-D float32 unit vector; ValueError for an empty, zero or non-finite one."""
    array = np.asarray(vector, dtype=np.float32).reshape(-1)
    if array.size == 0 or not np.all(np.isfinite(array)):
        raise ValueError("an embedding must be a non-empty vector of finite numbers")
    norm = float(np.linalg.norm(array))
    if norm == 0.0:
        raise ValueError("an embedding of all zeros has no direction")
    return (array / norm).astype(np.float32)


def query_vector(embeddings: Iterable[npt.ArrayLike]) -> npt.NDArray[np.float32]:
    """The query of a series: the normalised mean of its images' normalised embeddings."""
    vectors = [normalised(e) for e in embeddings]
    if not vectors:
        raise ValueError("no embeddings to query with")
    return normalised(np.mean(np.stack(vectors), axis=0))


def embedding_rows(
    *,
    result_id: int,
    study_instance_uid: str,
    series_instance_uid: str,
    images: Sequence[tuple[int, str, str, npt.ArrayLike]],
    key: str,
    ground_truth: str | None = None,
) -> list[CaseEmbedding]:
    """One row per image: ``images`` are (1-based index in the result, SOPInstanceUID, label,
    embedding)."""
    return [
        CaseEmbedding(
            result_id=result_id,
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            sop_instance_uid=sop_uid,
            image_index=index,
            model_key=key,
            label=label,
            ground_truth=ground_truth,
            embedding=normalised(embedding).astype(EMBEDDING_DTYPE).tobytes(),
        )
        for index, sop_uid, label, embedding in images
    ]


def rank(
    query: npt.NDArray[np.float32],
    candidates: npt.NDArray[np.float32],
    groups: Sequence[str],
    k: int,
) -> list[tuple[int, float]]:
    """Indices of the ``k`` nearest candidates (cosine distance), one per group, nearest first.

    ``candidates`` are unit row vectors and ``groups[i]`` the case (study) of row i.
    """
    if k < 1 or len(candidates) == 0:
        return []
    if candidates.shape[1] != query.shape[0]:
        raise ValueError(
            f"embeddings of {candidates.shape[1]} dimensions cannot be compared with a "
            f"query of {query.shape[0]}"
        )
    distances = 1.0 - candidates @ query
    chosen: list[tuple[int, float]] = []
    seen: set[str] = set()
    for index in np.argsort(distances, kind="stable"):
        group = groups[int(index)]
        if group in seen:
            continue
        seen.add(group)
        chosen.append((int(index), float(distances[index])))
        if len(chosen) == k:
            break
    return chosen


def nearest(
    db: StateDB,
    query: npt.ArrayLike,
    key: str,
    *,
    k: int = 5,
    exclude_study: str | None = None,
) -> list[Neighbour]:
    """The ``k`` past cases (studies) nearest to ``query`` among embeddings of model ``key``."""
    vector = normalised(query)
    superseded = select(Result.predecessor_id).where(Result.predecessor_id.is_not(None))
    statement = select(CaseEmbedding).where(
        CaseEmbedding.model_key == key,
        # a superseded result is no past case of its own: its successor is
        CaseEmbedding.result_id.not_in(superseded),
    )
    if exclude_study is not None:
        statement = statement.where(CaseEmbedding.study_instance_uid != exclude_study)
    with db.session() as session:
        rows = list(session.scalars(statement.order_by(CaseEmbedding.id)).all())
    if not rows:
        return []
    matrix = np.stack([np.frombuffer(row.embedding, dtype=EMBEDDING_DTYPE) for row in rows])
    ranked = rank(vector, matrix, [row.study_instance_uid for row in rows], k)
    return [
        Neighbour(
            result_id=rows[i].result_id,
            study_instance_uid=rows[i].study_instance_uid,
            series_instance_uid=rows[i].series_instance_uid,
            sop_instance_uid=rows[i].sop_instance_uid,
            image_index=rows[i].image_index,
            label=rows[i].label,
            ground_truth=rows[i].ground_truth,
            distance=distance,
        )
        for i, distance in ranked
    ]


class NoEmbeddings(LookupError):
    """The result has no stored embeddings (it does not exist, or predates the index)."""


def similar_to_result(db: StateDB, result_id: int, k: int = 5) -> list[Neighbour]:
    """The past cases nearest to a stored result (its images' mean embedding), other studies."""
    with db.session() as session:
        result = session.get(Result, result_id)
        if result is None:
            raise NoEmbeddings(f"no result {result_id}")
        rows = list(
            session.scalars(
                select(CaseEmbedding)
                .where(CaseEmbedding.result_id == result_id)
                .order_by(CaseEmbedding.image_index)
            ).all()
        )
    if not rows:
        raise NoEmbeddings(f"result {result_id} has no stored embeddings")
    query = query_vector(np.frombuffer(row.embedding, dtype=EMBEDDING_DTYPE) for row in rows)
    return nearest(db, query, rows[0].model_key, k=k, exclude_study=result.study_instance_uid)


def set_ground_truth(db: StateDB, result_id: int, label: str | None) -> int:
    """Record the confirmed diagnosis of a result's images (None clears it); rows changed."""
    with db.session() as session:
        if session.get(Result, result_id) is None:
            raise NoEmbeddings(f"no result {result_id}")
        changed = session.execute(
            update(CaseEmbedding)
            .where(CaseEmbedding.result_id == result_id)
            .values(ground_truth=label)
        )
        return int(getattr(changed, "rowcount", 0) or 0)


class GroundTruth(BaseModel):
    """The confirmed diagnosis of a case (e.g. from pathology), or null to clear it."""

    label: str | None = Field(min_length=1, max_length=32, pattern=r"^[a-z_]+$")


def similar_router(db: StateDB) -> APIRouter:
    """``GET /results/{id}/similar?k=5``: the nearest past cases of a result;
    ``PUT /results/{id}/ground-truth``: the confirmed diagnosis shown with it as a past case."""
    router = APIRouter()

    @router.put("/results/{result_id}/ground-truth")
    def ground_truth(result_id: int, body: GroundTruth) -> dict[str, object]:
        try:
            images = set_ground_truth(db, result_id, body.label)
        except NoEmbeddings as exc:
            raise HTTPException(404, str(exc)) from exc
        return {"result_id": result_id, "ground_truth": body.label, "images": images}

    @router.get("/results/{result_id}/similar")
    def similar_cases(result_id: int, k: int = Query(5, ge=1, le=100)) -> dict[str, object]:
        """Past cases (other studies, same model) nearest to the result's images, nearest
        first, with cosine distances and links to their heatmap and source image."""
        try:
            found = similar_to_result(db, result_id, k)
        except NoEmbeddings as exc:
            raise HTTPException(404, str(exc)) from exc
        return {"result_id": result_id, "k": k, "items": [n.to_json() for n in found]}

    return router
