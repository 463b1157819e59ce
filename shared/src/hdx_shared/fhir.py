"""The FHIR codec: strict JSON in, validated FHIR out, OperationOutcome for every failure.

HDX speaks FHIR R4 (4.0.1) on the wire. fhir.resources' R4B models are wire-compatible with R4
for the resources HDX handles, and this module is the one place that choice is made.

Parse once, at ingress. Later hops read the JSON with orjson when they need a field and pass
the bytes on; nothing re-serialises a model on the hot path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import orjson
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from hdx_shared.fhir_json_types import check_types, element_specs

FHIR_VERSION = "4.0.1"
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
FHIR_JSON = "application/fhir+json"


@dataclass(frozen=True, slots=True)
class Issue:
    """One OperationOutcome.issue: what is wrong and where (a FHIRPath-like expression)."""

    diagnostics: str
    code: str = "invalid"  # http://hl7.org/fhir/issue-type
    severity: str = "error"
    expression: str | None = None

    def to_fhir(self) -> dict[str, Any]:
        issue: dict[str, Any] = {
            "severity": self.severity,
            "code": self.code,
            "diagnostics": self.diagnostics,
        }
        if self.expression:
            issue["expression"] = [self.expression]
        return issue


def operation_outcome(issues: Iterable[Issue]) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome", "issue": [i.to_fhir() for i in issues]}


class FhirError(Exception):
    """Input HDX will not accept. `reason` is a short code for dead letters and metrics."""

    # A refusal (401/403) already recorded as a security alert where it was raised, with
    # more than the HTTP layer knows; hdx_shared.http records the others.
    audited: bool = False

    def __init__(
        self,
        reason: str,
        issues: list[Issue],
        http_status: int = 400,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.reason = reason
        self.issues = issues
        self.http_status = http_status
        self.headers = headers or {}  # e.g. WWW-Authenticate, Retry-After
        super().__init__(f"{reason}: " + "; ".join(i.diagnostics for i in issues))

    def outcome(self) -> dict[str, Any]:
        return operation_outcome(self.issues)

    def outcome_json(self) -> bytes:
        return orjson.dumps(self.outcome())


@dataclass(frozen=True, slots=True)
class Limits:
    max_bytes: int = 5 * 1024 * 1024
    max_depth: int = 32
    max_bundle_entries: int = 10_000


@lru_cache(maxsize=256)
def model_class(resource_type: str) -> Any:
    """The fhir.resources model for a resource type; FhirError if FHIR has no such type."""
    try:
        return get_fhir_model_class(resource_type)
    except (KeyError, ValueError) as exc:
        raise FhirError(
            "unknown-resource-type",
            [
                Issue(
                    f"'{resource_type}' is not a FHIR R4 resource type",
                    code="not-supported",
                    expression="resourceType",
                )
            ],
        ) from exc


class _StrictJsonError(ValueError):
    pass


def _strict_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # FHIR JSON forbids duplicate keys, nulls and empty values (FHIR R4 §2.6.2 "JSON").
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _StrictJsonError(f"duplicate JSON key '{dup}'")
    if not obj:
        raise _StrictJsonError("empty JSON object")
    for k, v in pairs:
        if v is None:
            raise _StrictJsonError(f"'{k}' is null; FHIR JSON leaves absent elements out")
        if v == "" or v == []:
            raise _StrictJsonError(f"'{k}' is empty; FHIR JSON leaves absent elements out")
        if type(v) is list and (None in v or "" in v):
            raise _StrictJsonError(f"'{k}' holds a null or empty value")
    return obj


def _depth(value: Any, limit: int) -> None:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, d = stack.pop()
        if d > limit:
            raise _StrictJsonError(f"JSON nested deeper than {limit} levels")
        if type(node) is dict:
            stack.extend((v, d + 1) for v in node.values() if type(v) in (dict, list))
        elif type(node) is list:
            stack.extend((v, d + 1) for v in node if type(v) in (dict, list))


def _clean(doc: dict[str, Any], limit: int) -> bool:
    """True if no object in `doc` is empty or has a null or empty value (or a list holding
    a null or an empty string), and nothing is nested deeper than `limit` — what the strict
    parser checks besides duplicate keys (`_strict_object`, `_depth`)."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, d = stack.pop()
        if d > limit:
            return False
        if type(node) is dict:
            if not node:
                return False
            for v in node.values():
                t = type(v)
                if t is dict:
                    stack.append((v, d + 1))
                elif t is list:
                    if not v or None in v or "" in v:
                        return False
                    stack.append((v, d + 1))
                elif v is None or v == "":
                    return False
        else:  # a list: its values were checked with the object holding it
            stack.extend((v, d + 1) for v in node if type(v) is dict or type(v) is list)
    return True


def _parse_canonical(raw: bytes, limits: Limits) -> dict[str, Any] | None:
    """The common case, cheaply: JSON exactly as orjson writes it (compact, no escapes it
    would not write), clean. orjson keeps the last of duplicate keys, so the document is
    written back and compared: equal bytes mean no key was dropped. None when the strict
    parser must decide (anything else — and every error, so its messages stay the same)."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if type(doc) is not dict or not _clean(doc, limits.max_depth):
        return None
    try:
        if orjson.dumps(doc) != raw:
            return None
    except TypeError:  # e.g. an integer beyond 64 bits
        return None
    return doc


def parse_json(raw: bytes, limits: Limits = Limits()) -> dict[str, Any]:
    """Strict FHIR JSON: size, syntax, duplicates, nulls, empties, depth; a dict or FhirError."""
    if len(raw) > limits.max_bytes:
        raise FhirError(
            "too-large",
            [
                Issue(
                    f"message is {len(raw)} bytes; the limit is {limits.max_bytes}",
                    code="too-costly",
                )
            ],
            http_status=413,
        )
    fast = _parse_canonical(raw, limits)
    if fast is not None:
        return fast
    try:
        doc = json.loads(raw, object_pairs_hook=_strict_object)
    except _StrictJsonError as exc:
        raise FhirError("invalid-json", [Issue(str(exc), code="structure")]) from exc
    except (ValueError, RecursionError) as exc:
        raise FhirError(
            "invalid-json", [Issue(f"not valid JSON: {exc}", code="structure")]
        ) from exc
    if type(doc) is not dict:
        raise FhirError(
            "invalid-json", [Issue("a FHIR resource is a JSON object", code="structure")]
        )
    try:
        _depth(doc, limits.max_depth)
    except _StrictJsonError as exc:
        raise FhirError("too-deep", [Issue(str(exc), code="too-costly")]) from exc
    return doc


# Required code bindings HDX relies on and fhir.resources does not enforce.
REQUIRED_CODES: dict[tuple[str, str], frozenset[str]] = {
    ("Patient", "gender"): frozenset({"male", "female", "other", "unknown"}),
    ("Observation", "status"): frozenset(
        {
            "registered",
            "preliminary",
            "final",
            "amended",
            "corrected",
            "cancelled",
            "entered-in-error",
            "unknown",
        }
    ),
    ("Encounter", "status"): frozenset(
        {
            "planned",
            "arrived",
            "triaged",
            "in-progress",
            "onleave",
            "finished",
            "cancelled",
            "entered-in-error",
            "unknown",
        }
    ),
    ("Condition", "clinicalStatus"): frozenset(),  # CodeableConcept: checked by the model
    ("Bundle", "type"): frozenset(
        {
            "document",
            "message",
            "transaction",
            "transaction-response",
            "batch",
            "batch-response",
            "history",
            "searchset",
            "collection",
        }
    ),
    ("Consent", "status"): frozenset(
        {"draft", "proposed", "active", "rejected", "inactive", "entered-in-error"}
    ),
}
REQUEST_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"})


def _check_codes(doc: dict[str, Any], where: str) -> list[Issue]:
    rtype = doc.get("resourceType")
    issues = []
    for (t, element), allowed in REQUIRED_CODES.items():
        if t != rtype or not allowed or element not in doc:
            continue
        value = doc[element]
        if not isinstance(value, str) or value not in allowed:
            issues.append(
                Issue(
                    f"{t}.{element} '{value}' is not one of {', '.join(sorted(allowed))}",
                    code="code-invalid",
                    expression=f"{where}{element}",
                )
            )
    return issues


def _pydantic_issues(exc: ValidationError, where: str) -> list[Issue]:
    out = []
    for err in exc.errors()[:20]:
        path = ".".join(str(p) for p in err["loc"] if p != "__root__")
        kind = "required" if err["type"] == "missing" else "value"
        out.append(
            Issue(
                f"{path or '(resource)'}: {err['msg']}",
                code=kind,
                expression=f"{where}{path}" if path else where.rstrip(".") or None,
            )
        )
    return out


def _type_issues(doc: dict[str, Any], model: Any, where: str) -> list[Issue]:
    return [
        Issue(d, code=c, expression=e) for d, c, e in check_types(doc, model, where, model_class)
    ]


def validate_resource(doc: dict[str, Any], where: str = "") -> None:
    """Check one resource (a Bundle with its entries) against FHIR R4; FhirError if not."""
    rtype = doc.get("resourceType")
    if not isinstance(rtype, str):
        raise FhirError(
            "not-fhir",
            [Issue("resourceType is missing", code="required", expression=f"{where}resourceType")],
        )
    model = model_class(rtype)
    issues = _check_codes(doc, where)
    rid = doc.get("id")
    if rid is not None and not (isinstance(rid, str) and FHIR_ID.fullmatch(rid)):
        issues.append(
            Issue(
                f"id '{str(rid)[:80]}' is not a FHIR id ([A-Za-z0-9-.], 1 to 64)",
                code="value",
                expression=f"{where}id",
            )
        )
    if rtype == "Bundle" and not isinstance(doc.get("entry", []), list):
        issues.append(
            Issue("Bundle.entry must be an array", code="structure", expression=f"{where}entry")
        )
        raise FhirError("invalid-resource", issues)
    if rtype == "Bundle":
        # Entries are checked one by one, each resource against its own type; the Bundle
        # model itself only sees its shell.
        shell = {k: v for k, v in doc.items() if k != "entry"}
        issues += _type_issues(shell, model, where)
        entry_model = element_specs(model)["entry"][2]
        for i, entry in enumerate(doc.get("entry", ())):
            at = f"{where}entry[{i}]."
            if not isinstance(entry, dict):
                issues.append(Issue("a Bundle entry is a JSON object", expression=at.rstrip(".")))
                continue
            outer = {k: v for k, v in entry.items() if k != "resource"}
            issues += _type_issues(outer, entry_model, at)
            req = entry.get("request")
            if isinstance(req, dict) and req.get("method") not in REQUEST_METHODS:
                issues.append(
                    Issue(
                        f"request.method '{req.get('method')}' is not an HTTP verb FHIR allows",
                        code="code-invalid",
                        expression=f"{at}request.method",
                    )
                )
            res = entry.get("resource")
            if isinstance(res, dict):
                try:
                    validate_resource(res, f"{at}resource.")
                except FhirError as exc:
                    issues.extend(exc.issues)
            elif res is not None:
                issues.append(Issue("entry.resource is a JSON object", expression=f"{at}resource"))
        if issues:
            raise FhirError("invalid-resource", issues)
        try:
            model.model_validate(shell)
        except ValidationError as exc:
            raise FhirError("invalid-resource", _pydantic_issues(exc, where)) from exc
        return
    issues += _type_issues(doc, model, where)
    if issues:
        # Wrong JSON types first: the model's coercing messages would only repeat them.
        raise FhirError("invalid-resource", issues)
    try:
        model.model_validate(doc)
    except ValidationError as exc:
        issues.extend(_pydantic_issues(exc, where))
    except (TypeError, ValueError, KeyError) as exc:  # fhir.resources raises these too
        issues.append(Issue(f"{type(exc).__name__}: {exc}", expression=where.rstrip(".") or None))
    if issues:
        raise FhirError("invalid-resource", issues)


def decode_resource(
    raw: bytes,
    limits: Limits = Limits(),
    expect: Callable[[dict[str, Any]], None] | None = None,
    parsed: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Parse and validate FHIR JSON bytes; the dict, or FhirError with an OperationOutcome.
    `expect` sees the parsed document before it is validated (and may refuse it). `parsed`:
    what `parse_json(raw, limits)` already returned, so the bytes are not parsed again."""
    doc = parse_json(raw, limits) if parsed is None else parsed
    if expect is not None:
        expect(doc)
    entries = doc.get("entry") if doc.get("resourceType") == "Bundle" else None
    if isinstance(entries, list) and len(entries) > limits.max_bundle_entries:
        raise FhirError(
            "too-large",
            [
                Issue(
                    f"Bundle has {len(doc['entry'])} entries; "
                    f"the limit is {limits.max_bundle_entries}",
                    code="too-costly",
                    expression="entry",
                )
            ],
            http_status=413,
        )
    validate_resource(doc)
    return doc


def dumps(doc: Any) -> bytes:
    return orjson.dumps(doc)


def loads(raw: bytes | str) -> Any:
    return orjson.loads(raw)


@dataclass(slots=True)
class Reference:
    """A parsed literal reference like 'Patient/123' (relative) — what publishers send."""

    resource_type: str
    id: str
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, ref: str) -> Reference | None:
        parts = ref.rstrip("/").split("/")
        if len(parts) >= 2 and parts[-2][:1].isupper():
            return cls(parts[-2], parts[-1])
        if len(parts) >= 4 and parts[-2] == "_history":
            return cls(parts[-4], parts[-3])
        return None
