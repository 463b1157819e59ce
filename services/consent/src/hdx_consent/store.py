"""The consent database adapter: append-only Consent versions (SQLModel; SQLite or PostgreSQL).

Every write is a new version; nothing is updated in place except the outbox flag. Database
failures surface as `messaging.Unavailable`, so the gate and the API fail closed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import wraps
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import orjson
from sqlalchemy import and_, func, or_, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlmodel import Session, col, select

from hdx_consent.domain.timeutil import fhir_instant
from hdx_consent.models import ConsentVersion
from hdx_shared.db import migrate
from hdx_shared.messaging import Unavailable

P = ParamSpec("P")
R = TypeVar("R")


class VersionConflict(Exception):
    """If-Match named a version that is not the current one (or the id was taken)."""

    def __init__(self, consent_id: str, expected: int | None, current: int | None) -> None:
        self.consent_id, self.expected, self.current = consent_id, expected, current
        super().__init__(f"Consent/{consent_id}: expected version {expected}, current is {current}")


def _db(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn a database that is down into Unavailable (integrity errors pass through)."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except IntegrityError:
            raise
        except (OperationalError, DBAPIError) as exc:
            raise Unavailable(
                f"consent database: {type(exc).__name__}: {str(exc.orig) if exc.orig else exc}"[
                    :300
                ]
            ) from exc

    return wrapper


def stamp(doc: dict[str, Any], consent_id: str, version: int, at: datetime) -> dict[str, Any]:
    """The Consent as stored: the server's id, versionId and lastUpdated."""
    out = dict(doc)
    out["id"] = consent_id
    meta = dict(out.get("meta") or {})
    meta["versionId"] = str(version)
    meta["lastUpdated"] = fhir_instant(at)
    out["meta"] = meta
    return out


class ConsentStore:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _session(self) -> Session:
        return Session(self.engine, expire_on_commit=False)

    @_db
    def create_schema(self) -> None:
        """Bring the database to the newest schema (Alembic migrations in the package)."""
        migrate(self.engine, Path(__file__).with_name("migrations"))

    @_db
    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    @_db
    def append(
        self,
        consent_id: str,
        doc: dict[str, Any],
        *,
        patient_key: str,
        status: str,
        patient_identifier: str | None = None,
        if_match: int | None = None,
        create_only: bool = False,
    ) -> ConsentVersion:
        """Store the next version of `consent_id`; VersionConflict if `if_match` is not the
        current version, or `create_only` and the id exists."""
        for _attempt in range(3):
            with self._session() as s:
                current = s.exec(
                    select(func.max(ConsentVersion.version)).where(
                        ConsentVersion.consent_id == consent_id
                    )
                ).one()
                if (create_only and current is not None) or (
                    if_match is not None and current != if_match
                ):
                    raise VersionConflict(consent_id, if_match, current)
                version = (current or 0) + 1
                now = datetime.now(UTC)
                stored = stamp(doc, consent_id, version, now)
                row = ConsentVersion(
                    consent_id=consent_id,
                    version=version,
                    patient_key=patient_key,
                    status=status,
                    patient_identifier=patient_identifier,
                    resource=orjson.dumps(stored),
                    recorded=now,
                )
                s.add(row)
                try:
                    s.commit()
                except IntegrityError:
                    s.rollback()
                    if if_match is not None or create_only:
                        raise VersionConflict(consent_id, if_match, version) from None
                    continue  # another writer took this version: take the next
                return row
        raise VersionConflict(consent_id, if_match, None)

    @_db
    def latest(self, consent_id: str) -> ConsentVersion | None:
        with self._session() as s:
            return s.exec(
                select(ConsentVersion)
                .where(ConsentVersion.consent_id == consent_id)
                .order_by(col(ConsentVersion.version).desc())
                .limit(1)
            ).first()

    @_db
    def version(self, consent_id: str, version: int) -> ConsentVersion | None:
        with self._session() as s:
            return s.get(ConsentVersion, (consent_id, version))

    @_db
    def history(self, consent_id: str) -> list[ConsentVersion]:
        """Newest first, as a FHIR history Bundle lists them."""
        with self._session() as s:
            return list(
                s.exec(
                    select(ConsentVersion)
                    .where(ConsentVersion.consent_id == consent_id)
                    .order_by(col(ConsentVersion.version).desc())
                )
            )

    def _latest_query(self) -> Any:
        newest = (
            select(
                col(ConsentVersion.consent_id).label("cid"),
                func.max(ConsentVersion.version).label("v"),
            )
            .group_by(col(ConsentVersion.consent_id))
            .subquery()
        )
        return select(ConsentVersion).join(
            newest,
            and_(
                col(ConsentVersion.consent_id) == newest.c.cid,
                col(ConsentVersion.version) == newest.c.v,
            ),
        )

    @_db
    def latest_all(self) -> list[ConsentVersion]:
        """The current version of every consent (what the index is rebuilt from)."""
        with self._session() as s:
            return list(s.exec(self._latest_query()).all())

    @_db
    def recorded_since(self, since: datetime) -> list[ConsentVersion]:
        """Every version recorded at or after `since`, oldest first."""
        with self._session() as s:
            return list(
                s.exec(
                    select(ConsentVersion)
                    .where(col(ConsentVersion.recorded) >= since)
                    .order_by(col(ConsentVersion.recorded))
                ).all()
            )

    @_db
    def search(self, patient_keys: Sequence[str]) -> list[ConsentVersion]:
        """Current versions filed under any of the patient keys."""
        with self._session() as s:
            q = self._latest_query().where(
                or_(
                    col(ConsentVersion.patient_key).in_(patient_keys),
                    col(ConsentVersion.patient_identifier).in_(patient_keys),
                )
            )
            return list(s.exec(q.order_by(col(ConsentVersion.consent_id))).all())

    @_db
    def unpublished(self, limit: int = 500) -> list[ConsentVersion]:
        with self._session() as s:
            return list(
                s.exec(
                    select(ConsentVersion)
                    .where(col(ConsentVersion.published).is_(False))
                    .order_by(col(ConsentVersion.recorded))
                    .limit(limit)
                )
            )

    @_db
    def mark_published(self, keys: Sequence[tuple[str, int]]) -> None:
        if not keys:
            return
        with self._session() as s:
            for cid, version in keys:
                s.execute(
                    update(ConsentVersion)
                    .where(
                        and_(
                            col(ConsentVersion.consent_id) == cid,
                            col(ConsentVersion.version) == version,
                        )
                    )
                    .values(published=True)
                )
            s.commit()
