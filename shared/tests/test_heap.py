"""A service process's collector settings (hdx_shared.http.settle_heap_after_start)."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from hdx_shared.http import settle_heap_after_start
from hdx_shared.settings import HdxSettings


@pytest.fixture(autouse=True)
def collector_restored() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def _app(events: list[str]) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        events.append("started")
        yield
        events.append("stopped")

    return FastAPI(lifespan=lifespan)


def test_the_heap_is_frozen_once_the_service_has_started() -> None:
    events: list[str] = []
    app = _app(events)
    settle_heap_after_start(app, HdxSettings(gc_young_threshold=12_345))
    assert gc.get_threshold()[0] == 12_345
    assert gc.get_freeze_count() == 0
    with TestClient(app):
        assert events == ["started"]  # the service's own start ran first
        assert gc.get_freeze_count() > 0
    assert events == ["started", "stopped"]


def test_zero_leaves_the_collector_as_python_sets_it() -> None:
    before = gc.get_threshold()
    events: list[str] = []
    app = _app(events)
    settle_heap_after_start(app, HdxSettings(gc_young_threshold=0))
    with TestClient(app):
        assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == before and events == ["started", "stopped"]
