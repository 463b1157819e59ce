"""The match model file (an adapter): which weights the matcher runs on.

`HDX_MATCH_MODEL` names a JSON file written by `hdx-patient-index train-model` (a
`MatchModel` of domain/em.py: m and u per field and level, term frequencies, and how it was
trained, and the household evidence that may lift the twin and generation rules). Unset, the
matcher runs on the built-in prior weights of domain/weights.py with every rule, and the log
says so at start. A file that cannot be read or is not a valid model stops the service
from starting (`ModelFileError`): it never falls back to the priors silently, since the
weights decide which records are one person.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from hdx_patient_index.domain.em import MatchModel, ModelError
from hdx_patient_index.domain.matching import Hold, MatchConfig
from hdx_patient_index.domain.weights import DEFAULT_WEIGHTS
from hdx_patient_index.settings import PatientIndexSettings

log = logging.getLogger(__name__)


class ModelFileError(Exception):
    """HDX_MATCH_MODEL names a file that cannot be used; the message says why."""


def read_model(path: Path) -> tuple[MatchModel, str]:
    """The model in ``path`` and the file's SHA-256 (hex), or `ModelFileError`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"match model {path}: cannot be read: {exc.strerror or exc}") from exc
    try:
        model = MatchModel.loads(data)
    except ModelError as exc:
        raise ModelFileError(f"match model {path}: not a valid match model: {exc}") from exc
    return model, hashlib.sha256(data).hexdigest()


def write_model(model: MatchModel, path: Path) -> str:
    """Write the model (via a temporary file, then renamed); the file's SHA-256."""
    data = model.dumps() + b"\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return hashlib.sha256(data).hexdigest()


def match_config(settings: PatientIndexSettings) -> MatchConfig:
    """The matcher's configuration: the settings' thresholds, and the weights of the model
    file HDX_MATCH_MODEL names (checked; `ModelFileError` if unusable) or, when it is not
    set, the built-in priors. Logs which."""
    weights = DEFAULT_WEIGHTS
    lifted: frozenset[Hold] = frozenset()
    if settings.match_model is None:
        log.info(
            "match model: the built-in prior weights (domain/weights.py); "
            "HDX_MATCH_MODEL is not set"
        )
    else:
        model, digest = read_model(settings.match_model)
        weights = model.weights()
        # The hard-negative rules (twins, generations of one name) the model's data showed
        # no need for; the built-in priors keep them all.
        lifted = model.lifted_holds()
        log.info(
            "match model: %s (sha256 %s; %s); hard-negative rules lifted by its data: %s",
            settings.match_model,
            digest[:16],
            model.describe(),
            ", ".join(sorted(str(h) for h in lifted)) or "none",
        )
    return MatchConfig(
        upper=settings.match_upper_threshold,
        lower=settings.match_lower_threshold,
        prior_log2_odds=settings.match_prior_log2_odds,
        weights=weights,
        lifted_holds=lifted,
    )
