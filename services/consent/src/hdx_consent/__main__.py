"""`python -m hdx_consent`: run the consent service."""

from __future__ import annotations

from hdx_consent.app import create_app
from hdx_consent.settings import ConsentSettings
from hdx_shared.http import serve
from hdx_shared.telemetry import setup_logging


def main() -> None:
    settings = ConsentSettings()
    setup_logging(settings)
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
