"""The Kafka topics HDX uses, in one place, with how each is configured.

A message's path: inbound → validated → identified → routed → decided → feed.<subscriber>,
with audit and deadletter beside it (docs/architecture.md draws it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# What a publisher's own inbound topic may be called after "<prefix>inbound.": no dots, so
# that the name is one segment and no publisher's topic can sit under another's.
PUBLISHER_TOPIC_NAME = r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}"


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int = 6
    compacted: bool = False
    config: dict[str, str] = field(default_factory=dict)

    def topic_config(self) -> dict[str, str]:
        cfg = {"cleanup.policy": "compact" if self.compacted else "delete"}
        cfg.update(self.config)
        return cfg


@dataclass(frozen=True)
class Topics:
    """Topic names under one prefix, so several HDX installations can share a cluster."""

    prefix: str = "hdx."

    @property
    def inbound(self) -> str:
        """What publishers write: FHIR JSON resources or Bundles with CloudEvents headers."""
        return f"{self.prefix}inbound"

    def publisher_inbound(self, topic_name: str) -> str:
        """One publisher's own inbound topic. The exchange takes the publisher's source from
        the topic, so a Kafka ACL that lets a publisher write only here binds it to its
        source (docs/security.md)."""
        return f"{self.prefix}inbound.{topic_name}"

    @property
    def inbound_pattern(self) -> str:
        """A regex for every topic the exchange takes in: `inbound` and each publisher's."""
        return rf"^{re.escape(self.inbound)}(\.{PUBLISHER_TOPIC_NAME})?$"

    def publisher_topic_name(self, topic: str) -> str | None:
        """The publisher topic name of `topic` if it is a publisher's inbound topic."""
        head = f"{self.prefix}inbound."
        if topic.startswith(head) and re.fullmatch(PUBLISHER_TOPIC_NAME, topic[len(head) :]):
            return topic[len(head) :]
        return None

    @property
    def validated(self) -> str:
        """One valid FHIR resource per record, keyed by source|local patient id."""
        return f"{self.prefix}validated"

    @property
    def identified(self) -> str:
        """Resources stamped with the enterprise person id, keyed by it."""
        return f"{self.prefix}identified"

    @property
    def routed(self) -> str:
        """Resources with the subscriptions whose criteria they match (consent's input)."""
        return f"{self.prefix}routed"

    @property
    def decided(self) -> str:
        """Resources with the subscriptions consent permitted (delivery's input)."""
        return f"{self.prefix}decided"

    @property
    def links(self) -> str:
        """Compacted: source|local id → enterprise person id, from the patient index."""
        return f"{self.prefix}links"

    @property
    def consents(self) -> str:
        """Compacted: consent changes, so every consent replica converges."""
        return f"{self.prefix}consents"

    @property
    def audit(self) -> str:
        """FHIR AuditEvents for every decision HDX takes."""
        return f"{self.prefix}audit"

    @property
    def audit_anchors(self) -> str:
        """Compacted (key "head"): the audit log's newest sequence number and hash, kept
        outside its database so a cut-off tail shows."""
        return f"{self.prefix}audit.anchors"

    @property
    def deadletter(self) -> str:
        """What could not be accepted: original bytes plus an OperationOutcome header."""
        return f"{self.prefix}deadletter"

    def group(self, name: str) -> str:
        """A consumer group id under the same prefix ("hdx." → "hdx-<name>"), so two HDX
        installations on one cluster never share a group."""
        return f"{self.prefix.rstrip('.')}-{name}"

    def feed(self, subscriber: str) -> str:
        """A subscriber's own Kafka feed of notification Bundles."""
        return f"{self.prefix}feed.{subscriber}"

    @property
    def inbound_config(self) -> dict[str, str]:
        """What is published is kept a week, here and on every publisher's inbound topic."""
        return {"retention.ms": str(7 * 24 * 3600 * 1000)}

    def core(self) -> list[TopicSpec]:
        """The topics HDX itself needs before any service starts."""
        return [
            TopicSpec(self.inbound, config=self.inbound_config),
            TopicSpec(self.validated),
            TopicSpec(self.identified),
            TopicSpec(self.routed),
            TopicSpec(self.decided),
            TopicSpec(self.links, partitions=3, compacted=True),
            TopicSpec(self.consents, partitions=3, compacted=True),
            TopicSpec(self.audit, partitions=3, config={"retention.ms": "-1"}),
            TopicSpec(self.audit_anchors, partitions=1, compacted=True),
            TopicSpec(self.deadletter, partitions=3, config={"retention.ms": "-1"}),
        ]
