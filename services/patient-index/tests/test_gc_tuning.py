"""The index raises CPython's young-generation threshold, never lowers it."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from hdx_patient_index.gc_tuning import YOUNG_THRESHOLD, raise_young_threshold


@pytest.fixture(autouse=True)
def _restore() -> Iterator[None]:
    saved = gc.get_threshold()
    yield
    gc.set_threshold(*saved)


def test_the_default_threshold_is_raised_and_the_older_ones_kept() -> None:
    gc.set_threshold(700, 10, 10)
    raise_young_threshold()
    assert gc.get_threshold() == (YOUNG_THRESHOLD, 10, 10)


@pytest.mark.parametrize("setting", [(50_000, 5, 5), (0, 10, 10)])
def test_a_higher_setting_or_a_collector_switched_off_is_left_alone(
    setting: tuple[int, int, int],
) -> None:
    gc.set_threshold(*setting)
    raise_young_threshold()
    assert gc.get_threshold() == setting
