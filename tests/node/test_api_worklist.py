"""/worklist on a state DB with studies in every state; routing decisions and `routes test`."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from dicom_node.api import create_api
from dicom_node.cli import app as cli
from dicom_node.db import Job, Result, Series, StateDB, Study
from dicom_node.settings import Route, RouteCondition, Settings
from workers.routing import ResultFacts, route

T0 = datetime(2026, 1, 1, 8, 0, 0)


def _study(db: StateDB, n: int, *, date: str, series_state: str = "complete",
           job_state: str | None = "done", suspicion: float | None = None,
           modality: str = "US", results: int = 1) -> str:
    uid = f"1.2.3.{n}"
    with db.session() as session:
        session.add(Study(study_instance_uid=uid, accession_number=f"A{n}", study_date=date,
                          created_at=T0 + timedelta(minutes=n)))
        session.flush()
        session.add(Series(series_instance_uid=f"{uid}.1", study_instance_uid=uid,
                           modality=modality, state=series_state))
        session.flush()
        if job_state is None:
            return uid
        job = Job(series_instance_uid=f"{uid}.1", state=job_state)
        session.add(job)
        session.flush()
        for index in range(results if job_state == "done" else 0):
            p = suspicion if suspicion is not None else 0.0
            extra = Job(series_instance_uid=f"{uid}.1", state="done") if index else job
            if index:
                session.add(extra)
                session.flush()
            session.add(Result(
                job_id=extra.id, series_instance_uid=f"{uid}.1", study_instance_uid=uid,
                modality=modality, label="malignant" if p >= 0.5 else "normal", probability=p,
                probabilities={"malignant": p, "normal": 1 - p}, model_name="m",
                model_version="1", model_sha256="0" * 64, sr_sop_instance_uid=f"2.25.{n}{index}",
                suspicion=suspicion if index == results - 1 else 0.99,
                priority=(suspicion or 0) >= 0.5, files={"sr": "x", "sc": [], "png": ["a.png"]},
            ))
    return uid


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    settings = Settings(data_dir=tmp_path)
    db = StateDB(settings.sqlalchemy_url)
    _study(db, 1, date="20260101", suspicion=0.2)
    _study(db, 2, date="20260102", suspicion=0.9)
    _study(db, 3, date="20260103", suspicion=None, job_state="failed")
    _study(db, 4, date="20260104", series_state="receiving", job_state=None)
    _study(db, 5, date="20260105", suspicion=0.2, modality="MG")  # ties 1: arrival decides
    _study(db, 6, date="20260106", suspicion=0.3, results=2)  # superseded 0.99 must not count
    _study(db, 7, date="20260107", job_state="running")
    return TestClient(create_api(settings, db))


def test_worklist_order_states_and_superseded_results(client: TestClient) -> None:
    items = client.get("/worklist").json()["items"]
    assert [i["study_instance_uid"][-1] for i in items] == ["2", "6", "1", "5", "3", "4", "7"]
    state = {i["study_instance_uid"][-1]: i["state"] for i in items}
    assert state == {"1": "done", "2": "done", "3": "failed", "4": "receiving", "5": "done",
                     "6": "done", "7": "analysing"}
    top = items[0]
    assert top["priority"] is True and top["label"] == "malignant"
    assert top["heatmaps"] == [f"/results/{top['result_ids'][0]}/heatmap.png?index=1"]
    assert items[1]["suspicion"] == 0.3 and len(items[1]["result_ids"]) == 1


def test_worklist_filters(client: TestClient) -> None:
    def uids(**params: str) -> list[str]:
        items = client.get("/worklist", params=params).json()["items"]
        return [i["study_instance_uid"][-1] for i in items]

    assert uids(modality="MG") == ["5"]
    assert uids(state="failed") == ["3"]
    assert uids(state="receiving") == ["4"]
    assert uids(date_from="2026-01-02", date_to="20260103") == ["2", "3"]
    assert uids(priority="true") == ["2"]
    assert client.get("/worklist", params={"date_to": "Jan 3"}).status_code == 422


def test_forward_source_is_per_destination_and_unions_over_routes() -> None:
    routes = [
        Route(send_to=["archive"]),
        Route(when=RouteCondition(probability_at_least={"malignant": 0.5}),
              send_to=["reading", "archive"], forward_source=True),
        Route(when=RouteCondition(label=["benign"]), send_to=["benign"], forward_source=True),
    ]
    facts = ResultFacts(modality="US", calling_ae=None, label="malignant",
                        probabilities={"malignant": 0.6, "normal": 0.4})
    decision = route(routes, facts)
    assert decision.destinations == ["archive", "reading"]
    assert decision.forward_source == {"reading", "archive"}
    assert decision.matched_routes == [0, 1]


def test_result_facts_from_json() -> None:
    facts = ResultFacts.from_json({"modality": "US", "probabilities": {"a": 0.2, "b": 0.8}})
    assert facts.label == "b" and facts.calling_ae is None and not facts.not_assessable
    for bad in ({}, {"modality": "US"}, {"modality": "US", "probabilities": {"a": "x"}},
                {"modality": "US", "probabilities": {"a": 1}, "colour": "red"}):
        with pytest.raises(ValueError):
            ResultFacts.from_json(bad)


def test_routes_test_command(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        "destinations:\n"
        "  a: {host: 127.0.0.1, port: 104, ae_title: A}\n"
        "  b: {host: 127.0.0.1, port: 105, ae_title: B}\n"
        "routes:\n"
        "  - {when: {modality: MG}, send_to: [a]}\n"
        "  - {when: {not_assessable: true}, send_to: [b], forward_source: true}\n"
    )
    runner = CliRunner()
    result = {"modality": "US", "probabilities": {"normal": 1.0}}
    done = runner.invoke(cli, ["routes", "test", str(config), "--result", json.dumps(result)])
    assert done.exit_code == 0, done.output
    assert "destinations: none" in done.output
    result_file = tmp_path / "r.json"
    result_file.write_text(json.dumps({**result, "modality": "MG", "not_assessable": True}))
    done = runner.invoke(cli, ["routes", "test", str(config), "--json", "--result",
                               str(result_file)])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["destinations"] == [
        {"name": "a", "forward_source": False}, {"name": "b", "forward_source": True}]
