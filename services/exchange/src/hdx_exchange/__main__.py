"""`python -m hdx_exchange`: run the exchange service."""

from __future__ import annotations

from hdx_exchange.app import create_app
from hdx_exchange.settings import ExchangeSettings
from hdx_shared.http import serve
from hdx_shared.telemetry import setup_logging


def main() -> None:
    settings = ExchangeSettings()
    setup_logging(settings)
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
