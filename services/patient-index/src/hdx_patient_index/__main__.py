"""`python -m hdx_patient_index` (`hdx-patient-index`): run the patient index service;
`hdx-patient-index train-model OUT [--patients FILE …]` estimates a match model instead."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from hdx_patient_index.app import create_app
from hdx_patient_index.match_model import ModelFileError
from hdx_patient_index.settings import PatientIndexSettings
from hdx_shared.http import serve
from hdx_shared.telemetry import setup_logging

log = logging.getLogger("hdx_patient_index")


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["train-model"]:
        from hdx_patient_index.train import main as train_model

        raise SystemExit(train_model(args[1:]))
    settings = PatientIndexSettings()
    setup_logging(settings)
    try:
        app = create_app(settings)
    except ModelFileError as exc:  # HDX_MATCH_MODEL: refuse to start, never fall back
        log.error("not starting: %s", exc)
        raise SystemExit(f"hdx-patient-index: not starting: {exc}") from None
    serve(app, settings)


if __name__ == "__main__":
    main()
