"""Reading a FHIR R4 Subscription (Subscriptions Backport IG shape) into the domain."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from hdx_exchange.domain.routing import (
    ChannelType,
    Criteria,
    PayloadContent,
    Subscription,
)
from hdx_shared.fhir import FhirError, Issue

EXT_BASE = "https://hdx.example.org/fhir/StructureDefinition/"
RECIPIENT_EXT = EXT_BASE + "recipient"
PURPOSE_EXT = EXT_BASE + "purpose-of-use"
PAYLOAD_CONTENT_EXT = (
    "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition/backport-payload-content"
)
PURPOSES = frozenset(
    {
        "TREAT",
        "ETREAT",
        "HPAYMT",
        "HOPERAT",
        "HRESCH",
        "PUBHLTH",
        "PATRQT",
        "HMARKT",
        "HSYSADMIN",
        "CAREMGT",
        "HCOMPL",
        "HLEGAL",
    }
)


def _ext(element: Mapping[str, Any], url: str) -> Mapping[str, Any] | None:
    for e in element.get("extension", ()):
        if isinstance(e, dict) and e.get("url") == url:
            return e
    return None


def subscriber_id(recipient: str) -> str:
    """A Kafka-safe id for a recipient: Organization/care-home-1 → care-home-1."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", recipient.rsplit("/", 1)[-1])[:100]


def subscription_from_fhir(doc: Mapping[str, Any], sid: str) -> Subscription:
    issues: list[Issue] = []
    if doc.get("resourceType") != "Subscription":
        raise FhirError("wrong-type", [Issue("expected a Subscription", expression="resourceType")])
    criteria = None
    try:
        criteria = Criteria.parse(str(doc.get("criteria", "")))
    except FhirError as exc:
        issues.extend(exc.issues)
    recipient_ext = _ext(doc, RECIPIENT_EXT)
    recipient = ((recipient_ext or {}).get("valueReference") or {}).get("reference")
    if not isinstance(recipient, str) or "/" not in recipient:
        issues.append(
            Issue(
                f"extension {RECIPIENT_EXT} with valueReference "
                "(e.g. Organization/<id>) names who receives the data",
                code="required",
                expression="extension",
            )
        )
    purpose_ext = _ext(doc, PURPOSE_EXT)
    purpose = ((purpose_ext or {}).get("valueCoding") or {}).get("code", "TREAT")
    if purpose not in PURPOSES:
        issues.append(
            Issue(
                f"purpose of use '{purpose}' is not an HL7 v3 PurposeOfUse code HDX knows",
                code="code-invalid",
                expression="extension",
            )
        )
    channel = doc.get("channel") or {}
    ctype = channel.get("type")
    if ctype == "message":
        channel_type = ChannelType.KAFKA
    elif ctype == "rest-hook":
        channel_type = ChannelType.REST_HOOK
        endpoint = channel.get("endpoint")
        if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
            issues.append(
                Issue(
                    "a rest-hook channel needs an http(s) channel.endpoint",
                    code="required",
                    expression="channel.endpoint",
                )
            )
    else:
        channel_type = ChannelType.KAFKA
        issues.append(
            Issue(
                f"channel.type '{ctype}' is not supported; use 'message' "
                "(the subscriber's Kafka feed) or 'rest-hook'",
                code="not-supported",
                expression="channel.type",
            )
        )
    content_ext = _ext(channel.get("_payload") or {}, PAYLOAD_CONTENT_EXT)
    content = (content_ext or {}).get("valueCode", PayloadContent.FULL.value)
    try:
        payload = PayloadContent(content)
    except ValueError:
        issues.append(
            Issue(
                f"payload content '{content}' is not full-resource, id-only or empty",
                code="code-invalid",
                expression="channel._payload",
            )
        )
        payload = PayloadContent.FULL
    if issues or criteria is None or not isinstance(recipient, str):
        raise FhirError("invalid-subscription", issues, http_status=422)
    return Subscription(
        id=sid,
        subscriber=subscriber_id(recipient),
        recipient=recipient,
        purpose=purpose,
        criteria=criteria,
        channel=channel_type,
        endpoint=channel.get("endpoint"),
        headers=tuple(channel.get("header", ())),
        payload=payload,
        active=doc.get("status", "requested") in ("requested", "active"),
    )
