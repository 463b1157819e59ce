"""The consent service's settings (HDX_ environment variables on top of the shared ones).

Policy settings (see hdx_consent.domain.policy for what each means):

- HDX_DEFAULT_PERMIT_PURPOSES   purposes permitted when no consent applies (TREAT,ETREAT)
- HDX_DIRECT_CARE_PURPOSES      purposes the opt-out register does not block (TREAT,ETREAT)
- HDX_SENSITIVE_LABELS          meta.security codes denied unless a provision names them
- HDX_OPT_OUT_REGISTER          a file: one person id or 'system|value' a line
- HDX_BREAK_GLASS_ALLOWED       whether ETREAT with a stated reason may override a deny
- HDX_BREAK_GLASS_PURPOSES      the purposes that can break the glass (ETREAT)

Lists are given as JSON (["TREAT","ETREAT"]) or comma-separated (TREAT,ETREAT).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field
from pydantic_settings import NoDecode

from hdx_consent.domain.policy import (
    DIRECT_CARE,
    EXCHANGE_ACTIONS,
    SENSITIVE_LABELS,
    Policy,
    opt_out_register,
)
from hdx_shared.settings import HdxSettings


def _codes(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [v.strip() for v in text.split(",") if v.strip()]
    return value


Codes = Annotated[frozenset[str], NoDecode, BeforeValidator(_codes)]


class ConsentSettings(HdxSettings):
    service_name: str = "consent"
    http_port: int = 8002
    # The base URL clients see (Location headers, Bundle fullUrls).
    public_base_url: str = "http://127.0.0.1:8002/fhir"

    default_permit_purposes: Codes = DIRECT_CARE
    direct_care_purposes: Codes = DIRECT_CARE
    sensitive_labels: Codes = SENSITIVE_LABELS
    opt_out_register: Path | None = None
    break_glass_allowed: bool = True
    break_glass_purposes: Codes = frozenset({"ETREAT"})
    exchange_actions: Codes = EXCHANGE_ACTIONS

    # How often the database is pinged (a database that is down stops the gate).
    db_check_seconds: float = Field(default=5.0, gt=0)
    # The gate decides a batch only if the database answered within this many seconds;
    # 0 pings it before every batch (one cheap SELECT 1 per batch, not per message).
    gate_db_probe_seconds: float = Field(default=0.0, ge=0)
    # A database ping that takes longer than this counts as the database being down.
    db_ping_timeout_seconds: float = Field(default=5.0, gt=0)
    # How often versions not yet on the consents topic are sent (the outbox).
    outbox_seconds: float = Field(default=2.0, gt=0)
    publish_timeout_seconds: float = Field(default=10.0, gt=0)
    # How often each replica re-reads the versions recorded lately, so that a change the
    # consents topic lost (a broker restarted without its data) still reaches its index;
    # and how far back each re-read reaches before the last one (writers' clocks differ).
    reconcile_seconds: float = Field(default=10.0, gt=0)
    reconcile_overlap_seconds: float = Field(default=300.0, ge=0)

    def policy(self) -> Policy:
        """The exchange policy; reads the opt-out register file if one is configured."""
        opt_out: frozenset[str] = frozenset()
        if self.opt_out_register is not None:
            with self.opt_out_register.open(encoding="utf-8") as f:
                opt_out = opt_out_register(f)
        return Policy(
            default_permit_purposes=self.default_permit_purposes,
            direct_care_purposes=self.direct_care_purposes,
            sensitive_labels=self.sensitive_labels,
            opt_out=opt_out,
            break_glass_allowed=self.break_glass_allowed,
            break_glass_purposes=self.break_glass_purposes,
            exchange_actions=self.exchange_actions,
        )
