from __future__ import annotations

from hdx_shared.topics import Topics


def test_consumer_groups_follow_the_topic_prefix() -> None:
    assert Topics().group("exchange-ingress") == "hdx-exchange-ingress"
    assert Topics("traced.").group("consent") == "traced-consent"


def test_core_topics_share_the_prefix_and_links_are_compacted() -> None:
    specs = {s.name: s for s in Topics("x.").core()}
    assert all(name.startswith("x.") for name in specs)
    assert specs["x.links"].topic_config()["cleanup.policy"] == "compact"
    assert specs["x.inbound"].topic_config()["cleanup.policy"] == "delete"
    assert Topics("x.").feed("home-1") == "x.feed.home-1"
