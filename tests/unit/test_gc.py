"""Garbage collection on the serving path: the start-up heap frozen, every pause timed."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from qwen_serve import aio, metrics


@pytest.fixture
def restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_freeze_heap_keeps_start_up_objects_out_of_collections(restore_gc: None) -> None:
    made_at_start_up = [object() for _ in range(1000)]
    aio.freeze_heap()
    assert gc.get_freeze_count() >= len(made_at_start_up)
    assert gc.get_threshold()[0] == aio.GC_YOUNG_THRESHOLD


def test_every_collection_is_timed_by_generation() -> None:
    metrics.process_metrics()
    before = REGISTRY.get_sample_value("qwen_serve_gc_pause_seconds_count", {"generation": "2"})
    gc.collect()
    after = REGISTRY.get_sample_value("qwen_serve_gc_pause_seconds_count", {"generation": "2"})
    assert (after or 0) == (before or 0) + 1
    total = REGISTRY.get_sample_value("qwen_serve_gc_pause_seconds_sum", {"generation": "2"})
    assert total is not None and total > 0
