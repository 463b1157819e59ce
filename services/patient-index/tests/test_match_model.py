"""The match model file (HDX_MATCH_MODEL): loaded and checked at start, used by the
service's matcher; `hdx-patient-index train-model` writes one."""

from __future__ import annotations

import logging
from pathlib import Path

import orjson
import pytest
from pix_builders import RIVERSIDE, ST_MARYS, TOPICS, msg, patient

from hdx_patient_index.__main__ import main as service_main
from hdx_patient_index.app import create_app
from hdx_patient_index.domain.comparators import Field, Level
from hdx_patient_index.domain.em import MatchModel
from hdx_patient_index.domain.identifiers import TrustedSystems
from hdx_patient_index.domain.matching import Hold, Matcher
from hdx_patient_index.domain.weights import DEFAULT_WEIGHTS, PRIOR_PROBABILITIES
from hdx_patient_index.match_model import ModelFileError, match_config, read_model, write_model
from hdx_patient_index.pipeline import IdentifyStage
from hdx_patient_index.service import PatientIndexService
from hdx_patient_index.settings import PatientIndexSettings
from hdx_patient_index.store import PatientIndexStore
from hdx_patient_index.train import main as train_main
from hdx_shared.db import make_engine


def birth_date_model(u_exact: float = 1e-6) -> MatchModel:
    """The priors, except that an equal birth date is much rarer by chance (u 1e-6, not
    1e-4): name, birth date and gender alone then weigh above the upper threshold (30)."""
    u = {f: {lv: p[1] for lv, p in ls.items()} for f, ls in PRIOR_PROBABILITIES.items()}
    born = u[Field.BIRTH_DATE]
    born[Level.DISAGREE] += born[Level.EXACT] - u_exact
    born[Level.EXACT] = u_exact
    return MatchModel(
        m={f: {lv: p[0] for lv, p in ls.items()} for f, ls in PRIOR_PROBABILITIES.items()},
        u=u,
        match_proportion=0.1,
        training={"records": 1234, "seed": 7},
    )


def settings_for(tmp_path: Path, model: Path | None) -> PatientIndexSettings:
    return PatientIndexSettings(  # type: ignore[call-arg]
        _env_file=None,
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'pix.db'}",
        environment="test",
        match_model=model,
    )


def test_the_built_in_priors_without_a_model_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="hdx_patient_index.match_model"):
        config = match_config(settings_for(tmp_path, None))
    assert config.weights is DEFAULT_WEIGHTS and (config.upper, config.lower) == (30.0, 18.0)
    assert "built-in prior weights" in caplog.text and "HDX_MATCH_MODEL is not set" in caplog.text


def test_a_model_file_round_trips_and_its_digest_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "models" / "model.json"
    digest = write_model(birth_date_model(), path)
    model, read_digest = read_model(path)
    assert model == birth_date_model() and read_digest == digest
    with caplog.at_level(logging.INFO, logger="hdx_patient_index.match_model"):
        config = match_config(settings_for(tmp_path, path))
    assert config.weights == birth_date_model().weights()
    assert config.weights != DEFAULT_WEIGHTS
    assert str(path) in caplog.text and digest[:16] in caplog.text and "records 1234" in caplog.text


def test_the_service_lifts_only_the_rules_its_models_data_showed_no_need_for(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # As the matching benchmark runs: twins absent from the data (as many twin-shaped home
    # pairs as one person's own records explain), generations of one name present.
    clear = {
        "pairs_agreeing": 400,
        "pairs_shaped": 14,
        "anchor_agreeing": 1000,
        "anchor_shaped": 35,
    }
    twins = {
        "pairs_agreeing": 400,
        "pairs_shaped": 90,
        "anchor_agreeing": 1000,
        "anchor_shaped": 35,
    }
    base = birth_date_model()
    model = MatchModel(
        base.m, base.u, base.match_proportion, household={"twin": clear, "generation": twins}
    )
    path = tmp_path / "model.json"
    write_model(model, path)
    with caplog.at_level(logging.INFO, logger="hdx_patient_index.match_model"):
        config = match_config(settings_for(tmp_path, path))
    assert config.lifted_holds == {Hold.TWIN}
    assert "rules lifted by its data: twin" in caplog.text
    # The built-in priors, and a model without household evidence, keep every rule.
    assert match_config(settings_for(tmp_path, None)).lifted_holds == frozenset()
    write_model(birth_date_model(), path)
    assert match_config(settings_for(tmp_path, path)).lifted_holds == frozenset()


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (None, "cannot be read"),
        (b"{truncated", "not a valid match model: not JSON"),
        (b'{"version": 2}', "not a valid match model: unsupported match model version 2"),
        (b'{"version": 1, "m": {}, "u": {}}', "m has no field 'family'"),
    ],
)
def test_a_missing_or_broken_model_file_stops_the_start(
    tmp_path: Path, content: bytes | None, why: str
) -> None:
    path = tmp_path / "model.json"
    if content is not None:
        path.write_bytes(content)
    settings = settings_for(tmp_path, path)
    with pytest.raises(ModelFileError, match=why) as caught:
        create_app(settings)
    assert str(path) in str(caught.value)


def test_the_service_entry_point_refuses_to_start_on_a_broken_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "model.json").write_text('{"version": 1}')
    monkeypatch.setenv("HDX_MATCH_MODEL", str(tmp_path / "model.json"))
    monkeypatch.setenv("HDX_DATA_DIR", str(tmp_path))
    # The process's logging set-up is not this test's business (it replaces root handlers).
    monkeypatch.setattr("hdx_patient_index.__main__.setup_logging", lambda settings: None)
    with pytest.raises(SystemExit) as caught:
        service_main([])
    assert "not starting" in str(caught.value) and "not a valid match model" in str(caught.value)


def _link_two_sources(settings: PatientIndexSettings) -> tuple[str, str]:
    """Ada at two hospitals, name, birth date and gender alike, nothing else: the persons
    the service's stage files the two records under (matcher configured as create_app
    configures it)."""
    store = PatientIndexStore(make_engine(settings))
    try:
        service = PatientIndexService(store, Matcher(match_config(settings)), TrustedSystems.of([]))
        assert service.load()
        stage = IdentifyStage(service, TOPICS)
        persons = []
        for source in (ST_MARYS, RIVERSIDE):
            out = stage.process([msg(patient("p1"), source)])
            identified = [o for o in out if o.topic == TOPICS.identified]
            persons.append(identified[0].headers["hdx_person"])
        return persons[0], persons[1]
    finally:
        store.engine.dispose()


def test_a_service_configured_with_a_trained_model_decides_with_its_weights(
    tmp_path: Path,
) -> None:
    # The priors weigh name + birth date + gender at about 28: below the upper threshold.
    priors = tmp_path / "priors"
    priors.mkdir()
    first, second = _link_two_sources(settings_for(priors, None))
    assert first != second
    # The model makes an equal birth date rarer by chance (+6.6): the same records link.
    trained = tmp_path / "trained"
    trained.mkdir()
    write_model(birth_date_model(), trained / "model.json")
    first, second = _link_two_sources(settings_for(trained, trained / "model.json"))
    assert first == second


def _patients(n: int) -> list[dict[str, object]]:
    families = ["Smith", "Jones", "Taylor", "Brown", "Wilson", "Evans", "Thomas", "Roberts"]
    givens = ["Ada", "Bob", "Cara", "Dan", "Eve", "Finn", "Gus", "Hal", "Ivy", "Jo", "Kit"]
    out: list[dict[str, object]] = []
    for i in range(n):
        doc = patient(
            f"p{i}",
            family=families[i % len(families)],
            given=givens[(i // len(families)) % len(givens)],
            birth_date=f"{1930 + i % 70}-{1 + i % 12:02d}-{1 + i % 28:02d}",
            gender=("female", "male")[i % 2],
            postcode=f"AB{i % 40} {i % 9}CD",
        )
        out.append(doc)
    return out


def test_train_model_from_fhir_files_writes_a_model_the_service_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = _patients(300)
    ndjson = tmp_path / "patients.ndjson"
    ndjson.write_bytes(b"\n".join(orjson.dumps(d) for d in docs[:200]))
    bundle = tmp_path / "bundle.json"
    bundle.write_bytes(
        orjson.dumps(
            {
                "resourceType": "Bundle",
                "type": "collection",
                "entry": [{"resource": d} for d in docs[200:]],
            }
        )
    )
    out = tmp_path / "model.json"
    assert train_main([str(out), "--patients", str(ndjson), str(bundle), "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    assert "records 300" in printed and "HDX_MATCH_UPPER_THRESHOLD=" in printed
    model, _ = read_model(out)
    assert model.training["records"] == 300 and model.training["seed"] == 3
    assert model.training["source"] == "files: patients.ndjson, bundle.json"
    assert match_config(settings_for(tmp_path, out)).weights == model.weights()


def test_train_model_from_the_index_database(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings_for(tmp_path, None)
    store = PatientIndexStore(make_engine(settings))
    service = PatientIndexService(store, Matcher(), TrustedSystems.of([]))
    assert service.load()
    IdentifyStage(service, TOPICS).process([msg(d) for d in _patients(150)])
    store.engine.dispose()
    monkeypatch.setenv("HDX_DATABASE_URL", settings.database_url or "")
    out = tmp_path / "model.json"
    assert train_main([str(out)]) == 0
    model, _ = read_model(out)
    assert model.training["records"] == 150 and model.training["persons"] == 150
    assert model.training["source"] == "the patient index's database"
    assert "thresholds for 150 persons" in capsys.readouterr().out


def test_train_model_refuses_too_few_records_and_unreadable_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    few = tmp_path / "few.json"
    few.write_bytes(orjson.dumps(_patients(5)))
    assert train_main([str(tmp_path / "m.json"), "--patients", str(few)]) == 1
    assert "5 records" in capsys.readouterr().err
    broken = tmp_path / "broken.ndjson"
    broken.write_text('{"resourceType": "Patient"}\n{oops\n')
    assert train_main([str(tmp_path / "m.json"), "--patients", str(broken)]) == 1
    assert "not JSON" in capsys.readouterr().err
    assert not (tmp_path / "m.json").exists()
