"""The consent service's table: every version of every Consent, as written (history kept)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlmodel import Field, SQLModel


def _now() -> datetime:
    return datetime.now(UTC)


class ConsentVersionBase(SQLModel):
    consent_id: str
    version: int
    patient_key: str  # 'Patient/<enterprise id>', else the identifier 'system|value'
    patient_identifier: str | None = None  # 'system|value' when the patient has one
    status: str


class ConsentVersion(ConsentVersionBase, table=True):
    """One accepted write. (consent_id, version) is the key, so two writers racing for the
    same next version cannot both win."""

    __tablename__ = "consent_version"

    consent_id: str = Field(primary_key=True)
    version: int = Field(primary_key=True)
    patient_key: str = Field(index=True)
    patient_identifier: str | None = Field(default=None, index=True)
    status: str
    resource: bytes  # the Consent JSON as stored: id, meta.versionId, meta.lastUpdated set
    # Indexed: replicas re-read what was recorded lately (ConsentService.reconcile).
    recorded: datetime = Field(default_factory=_now, index=True)
    # Outbox: set once the version is on the consents topic; a loop sends what is not.
    published: bool = Field(default=False, index=True)
