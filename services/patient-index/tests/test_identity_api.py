"""The identity operations over HTTP: review tasks, link/unlink, merge/unmerge, ETags and
If-Match (409 on a concurrent change), and the review list of an unmerge."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pix_builders import NHS_A, NHS_B, RIVERSIDE, ST_MARYS, TOPICS, msg, observation, patient

from hdx_patient_index.api import build_router
from hdx_patient_index.domain.identifiers import TrustedSystems
from hdx_patient_index.domain.matching import Matcher
from hdx_patient_index.operations import IdentityOperations
from hdx_patient_index.pipeline import IdentifyStage
from hdx_patient_index.service import PatientIndexService
from hdx_patient_index.store import PatientIndexStore
from hdx_shared.auth import LocalTokens, install_auth
from hdx_shared.db import make_engine
from hdx_shared.http import FhirResponse, install_fhir_errors
from hdx_shared.messaging import Outgoing
from hdx_shared.settings import HdxSettings

GRACE: dict[str, Any] = {"family": "Hopper", "given": "Grace", "birth_date": "1906-12-09"}


@dataclass
class Api:
    client: TestClient
    stage: IdentifyStage
    ada: str
    twin: str
    grace: str
    sent: list[Outgoing] = field(default_factory=list)

    def version(self, person: str) -> str:
        r = self.client.get(f"/fhir/Patient/{person}")
        assert r.status_code == 200
        return str(r.headers["ETag"])


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    store = PatientIndexStore(make_engine(HdxSettings(data_dir=tmp_path, database_url=url)))
    service = PatientIndexService(store, Matcher(), TrustedSystems())
    assert service.load()
    stage = IdentifyStage(service, TOPICS)
    out = stage.process(
        [
            msg(patient("p1", nhs=NHS_A, postcode="SW1A 1AA")),
            msg(patient("r9"), RIVERSIDE),
            msg(patient("g1", nhs=NHS_B, **GRACE)),
        ]
    )
    ada, twin, grace = (o.headers["hdx_person"] for o in out if o.topic == TOPICS.identified)
    sent: list[Outgoing] = []

    async def publish(records: Sequence[Outgoing]) -> None:
        sent.extend(records)

    app = FastAPI(default_response_class=FhirResponse)
    install_fhir_errors(app)
    tokens = LocalTokens.generate()
    install_auth(app, tokens.authenticator())
    ops = IdentityOperations(service, TOPICS)
    app.include_router(build_router(service, "http://pix.test/fhir", ops=ops, publish=publish))
    headers = tokens.headers("system/Patient.rs system/hdx-identity")
    with TestClient(app, headers=headers) as client:
        yield Api(client, stage, ada, twin, grace, sent)
    store.engine.dispose()


def test_list_read_and_resolve_a_review_task(api: Api) -> None:
    [task] = api.client.get("/review-tasks", params={"person": api.twin}).json()
    assert task["reason"] == "possible-match" and task["candidate_person_id"] == api.ada
    assert api.client.get("/review-tasks", params={"person": api.grace}).json() == []
    r = api.client.get(f"/review-tasks/{task['id']}")
    assert r.status_code == 200 and set(r.json()["versions"]) == {api.ada, api.twin}
    assert r.headers["ETag"] == api.version(api.twin)

    state = api.client.get(f"/identity/{api.twin}").json()
    assert state["uncertain"] is True and state["reasons"] == ["possible-match"]
    assert [c["person"] for c in state["candidates"]] == [api.twin, api.ada]

    r = api.client.post(
        f"/review-tasks/{task['id']}/$resolve",
        json={"resolution": "different-person", "reviewer": "dr-a"},
        headers={"If-Match": r.headers["ETag"]},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["action"] == "separate" and body["task"] == task["id"]
    assert r.headers["ETag"] == api.version(api.twin)
    assert {o.topic for o in api.sent} >= {TOPICS.links, TOPICS.audit, TOPICS.identified}
    assert api.client.get(f"/identity/{api.twin}").json()["uncertain"] is False
    assert api.client.get("/review-tasks").json() == []
    done = api.client.get("/review-tasks", params={"status": "resolved"}).json()
    assert [(t["resolution"], t["resolved_by"]) for t in done] == [("different-person", "dr-a")]

    again = api.client.post(
        f"/review-tasks/{task['id']}/$resolve",
        json={"resolution": "same-person", "reviewer": "dr-b"},
    )
    assert again.status_code == 409
    assert again.json()["resourceType"] == "OperationOutcome"


def test_a_stale_if_match_is_409_and_changes_nothing(api: Api) -> None:
    stale = api.version(api.ada)
    r = api.client.post(
        f"/fhir/Patient/{api.ada}/$link",
        json={"source": RIVERSIDE, "local_id": "r9", "reviewer": "dr-a"},
        headers={"If-Match": stale},
    )
    assert r.status_code == 200, r.text
    assert r.headers["ETag"] != stale
    lost = api.client.post(
        f"/fhir/Patient/{api.ada}/$merge",
        json={"merged": api.grace, "reviewer": "dr-b"},
        headers={"If-Match": stale},
    )
    assert lost.status_code == 409
    assert lost.json()["issue"][0]["code"] == "conflict"
    # Versions of other persons travel in the body.
    grace_version = int(api.version(api.grace).strip('W/"'))
    lost = api.client.post(
        f"/fhir/Patient/{api.ada}/$merge",
        json={"merged": api.grace, "reviewer": "dr-b", "versions": {api.grace: grace_version - 1}},
    )
    assert lost.status_code == 409
    assert api.client.get("/merges").json() == []
    bad = api.client.post(
        f"/fhir/Patient/{api.ada}/$merge",
        json={"merged": api.grace, "reviewer": "dr-b"},
        headers={"If-Match": "yesterday"},
    )
    assert bad.status_code == 400


def test_merge_then_unmerge_lists_what_was_emitted_in_between(api: Api) -> None:
    r = api.client.post(
        f"/fhir/Patient/{api.ada}/$merge", json={"merged": api.grace, "reviewer": "dr-a"}
    )
    assert r.status_code == 200, r.text
    merge_id, task_id = r.json()["merge"], r.json()["task"]
    golden = api.client.get(f"/fhir/Patient/{api.ada}").json()
    assert {"type": "replaces"}.items() <= golden["link"][0].items()
    retired = api.client.get(f"/fhir/Patient/{api.grace}").json()
    assert retired["active"] is False and retired["link"][0]["type"] == "replaced-by"
    [review] = api.client.get("/review-tasks", params={"person": api.grace}).json()
    assert review["id"] == task_id and review["reason"] == "merge-review"

    [during] = api.stage.process([msg(observation("o5", "g1"), event_id="during")])
    assert during.headers["hdx_identity"] == "uncertain"

    r = api.client.post(f"/fhir/Patient/{api.ada}/$unmerge", json={"reviewer": "dr-b"})
    assert r.status_code == 200, r.text
    assert [e["event_id"] for e in r.json()["events"]] == ["during"]
    listed = api.client.get(f"/merges/{merge_id}/events").json()
    assert listed["status"] == "unmerged" and listed["to_ms"] is not None
    assert [e["event_id"] for e in listed["events"]] == ["during"]
    assert api.client.get(f"/merges/{merge_id}").json()["unmerged_by"] == "dr-b"
    assert api.client.get("/merges", params={"person": api.grace}).json()[0]["id"] == merge_id
    assert api.client.get(f"/fhir/Patient/{api.grace}").json()["active"] is True


def test_unlink_and_errors(api: Api) -> None:
    link = {"source": RIVERSIDE, "local_id": "r9", "reviewer": "dr-a"}
    assert api.client.post(f"/fhir/Patient/{api.ada}/$link", json=link).status_code == 200
    r = api.client.post(f"/fhir/Patient/{api.ada}/$unlink", json=link)
    assert r.status_code == 200, r.text
    [record] = r.json()["records"]
    assert record["person"] not in (api.ada, api.twin)
    only = {"source": ST_MARYS, "local_id": "p1", "reviewer": "dr-a"}
    assert api.client.post(f"/fhir/Patient/{api.ada}/$unlink", json=only).status_code == 422
    no_reviewer = {"source": ST_MARYS, "local_id": "p1"}
    assert api.client.post(f"/fhir/Patient/{api.ada}/$link", json=no_reviewer).status_code == 400
    assert api.client.get("/merges/nope/events").status_code == 404
    assert api.client.get("/review-tasks/nope").status_code == 404
    assert api.client.get("/identity/nobody").status_code == 404
