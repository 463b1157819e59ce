"""HDX's producers place keyed records exactly where aiokafka's (and the Java client's)
default partitioner would: the cache of key hashes changes nothing but the cost."""

from __future__ import annotations

import random

from aiokafka.partitioner import DefaultPartitioner

from hdx_shared.messaging import KeyPartitioner


def test_same_partition_as_the_default_partitioner() -> None:
    ours, default = KeyPartitioner(), DefaultPartitioner()
    rng = random.Random(8)
    keys = [rng.randbytes(rng.randrange(0, 60)) for _ in range(2_000)]
    keys += [b"head", b"security", "urn:hdx:source:é|p-1".encode()]
    for key in keys * 2:  # the second time from the cache
        partitions = list(range(rng.randrange(1, 13)))
        assert ours(key, partitions, partitions) == default(key, partitions, partitions)


def test_the_cache_is_bounded() -> None:
    ours = KeyPartitioner()
    ours.MAX_KEYS = 10
    for i in range(25):
        ours(str(i).encode(), [0, 1, 2], [0, 1, 2])
    assert len(ours._hashes) <= 10


def test_unkeyed_records_go_to_an_available_partition() -> None:
    ours = KeyPartitioner()
    for _ in range(50):
        assert ours(None, [0, 1, 2, 3], [1, 2]) in (1, 2)
        assert ours(None, [0, 1, 2, 3], []) in (0, 1, 2, 3)
