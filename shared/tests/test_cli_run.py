"""`hdx run`'s options reach the local stack it starts (the stack itself: tests/flows)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
from typer.testing import CliRunner

from hdx_shared import cli
from hdx_shared.devstack import ServiceStartError


class Refused:
    """A stack that records how it was made and does not start."""

    made: ClassVar[dict[str, Any]] = {}

    def __init__(self, **kwargs: Any) -> None:
        Refused.made = kwargs

    def start(self, ready_timeout: float) -> None:
        raise ServiceStartError("not in this test")


def test_exchange_stages_run_the_exchange_as_one_process_each(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "LocalStack", Refused)
    args = ["run", "--data-dir", str(tmp_path), "--no-seed"]
    result = CliRunner().invoke(
        cli.app,
        [*args, "--exchange-stages", "ingress,router", "--exchange-stages", "delivery,audit-log"],
    )
    assert result.exit_code == 1 and "did not start" in result.output
    assert Refused.made["replica_env"] == {
        "exchange": [
            {"HDX_EXCHANGE_STAGES": "ingress,router"},
            {"HDX_EXCHANGE_STAGES": "delivery,audit-log"},
        ]
    }
    CliRunner().invoke(cli.app, args)
    assert Refused.made["replica_env"] == {}, "by default one exchange process runs every stage"
