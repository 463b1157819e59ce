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


def test_publisher_inbound_topics_match_the_ingress_pattern_and_nothing_else() -> None:
    import re

    topics = Topics("x.")
    pattern = re.compile(topics.inbound_pattern)
    assert topics.publisher_inbound("st-marys") == "x.inbound.st-marys"
    for name in ("x.inbound", "x.inbound.st-marys", "x.inbound.GP_12"):
        assert pattern.match(name), name
    for name in ("x.inbound.a.b", "x.inboundx", "x.inbound.", "x.validated", "y.inbound.a"):
        assert not pattern.match(name), name
    assert topics.publisher_topic_name("x.inbound.st-marys") == "st-marys"
    assert topics.publisher_topic_name("x.inbound") is None
    assert topics.publisher_topic_name("x.inbound.a.b") is None
