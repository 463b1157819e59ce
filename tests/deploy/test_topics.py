"""The topics compose creates and the Strimzi KafkaTopics are exactly hdx_shared's Topics.core()."""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hdx_shared.topics import Topics

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "create-topics.sh"

# Settings a deployment may add to a topic beyond what hdx_shared asks for.
DEPLOYMENT_EXTRAS = {"min.insync.replicas"}


def expected() -> dict[str, tuple[int, dict[str, str]]]:
    return {s.name: (s.partitions, s.topic_config()) for s in Topics("hdx.").core()}


def script_topics(prefix: str = "hdx.") -> dict[str, tuple[int, dict[str, str]]]:
    """The `topic NAME PARTITIONS KEY=VALUE...` calls of deploy/create-topics.sh."""
    found: dict[str, tuple[int, dict[str, str]]] = {}
    for line in SCRIPT.read_text().splitlines():
        if not line.startswith("topic "):
            continue
        words = shlex.split(line, comments=True)
        if len(words) >= 3:
            name, partitions, *configs = words[1:]
            assert f"{prefix}{name}" not in found, f"{name} created twice"
            found[f"{prefix}{name}"] = (int(partitions), dict(c.split("=", 1) for c in configs))
    return found


def test_the_brief_and_shared_agree() -> None:
    """The table in docs/operations.md: partitions, retention and compaction."""
    week = str(7 * 24 * 3600 * 1000)
    assert expected() == {
        "hdx.inbound": (6, {"cleanup.policy": "delete", "retention.ms": week}),
        "hdx.validated": (6, {"cleanup.policy": "delete"}),
        "hdx.identified": (6, {"cleanup.policy": "delete"}),
        "hdx.routed": (6, {"cleanup.policy": "delete"}),
        "hdx.decided": (6, {"cleanup.policy": "delete"}),
        "hdx.links": (3, {"cleanup.policy": "compact"}),
        "hdx.consents": (3, {"cleanup.policy": "compact"}),
        "hdx.audit": (3, {"cleanup.policy": "delete", "retention.ms": "-1"}),
        "hdx.audit.anchors": (1, {"cleanup.policy": "compact"}),
        "hdx.deadletter": (3, {"cleanup.policy": "delete", "retention.ms": "-1"}),
    }


def test_compose_topics_job_creates_the_core_topics() -> None:
    assert script_topics() == expected()
    text = SCRIPT.read_text()
    # Replication and min.insync.replicas come from the environment, per broker count.
    assert '--replication-factor "${rf}"' in text
    assert re.search(r"min\.insync\.replicas=\$\{min_isr\}", text)


def test_strimzi_topics_are_the_core_topics(
    render: Callable[[str], list[dict[str, Any]]],
    find: Callable[..., dict[str, dict[str, Any]]],
) -> None:
    for target in ("base", "overlays/dev", "overlays/production"):
        topics = find(render(target), "KafkaTopic")
        got: dict[str, tuple[int, dict[str, str]]] = {}
        for name, obj in topics.items():
            spec = obj["spec"]
            topic_name = spec.get("topicName", name)
            config = {k: str(v) for k, v in spec.get("config", {}).items()}
            extras = config.keys() - DEPLOYMENT_EXTRAS
            got[topic_name] = (spec["partitions"], {k: config[k] for k in extras})
            min_isr = int(config.get("min.insync.replicas", "1"))
            assert 1 <= min_isr <= spec["replicas"], f"{target} {name}"
            if spec["replicas"] >= 3:
                assert min_isr >= 2, f"{target} {name}: replicated but min ISR {min_isr}"
        assert got == expected(), target
    prod = find(render("overlays/production"), "KafkaTopic")
    assert all(t["spec"]["replicas"] >= 3 for t in prod.values())
