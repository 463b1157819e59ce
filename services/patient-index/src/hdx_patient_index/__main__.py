"""`python -m hdx_patient_index`: run the patient index service."""

from __future__ import annotations

from hdx_patient_index.app import create_app
from hdx_patient_index.settings import PatientIndexSettings
from hdx_shared.http import serve
from hdx_shared.telemetry import setup_logging


def main() -> None:
    settings = PatientIndexSettings()
    setup_logging(settings)
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
