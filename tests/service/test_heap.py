"""service/heap.py: start-up objects frozen out of full collections, and every pause on /metrics."""
import gc
import time

from prometheus_client import REGISTRY

from service.heap import freeze_startup_heap, watch_collector


def test_freeze_takes_the_startup_objects_out_of_full_collections():
    import torch  # noqa: F401 - a process with what a worker imports

    gc.unfreeze()  # start with nothing frozen, whatever ran before in this process
    before = len(gc.get_objects())  # what a full collection walks
    try:
        frozen = freeze_startup_heap("test-heap", "none")
        # A frozen object that dies later (another thread of this process frees it) leaves the count: the
        # count may only have fallen since (a fresh clone's run saw 747,328 frozen and 747,326 a moment later).
        assert 0.9 * before < gc.get_freeze_count() <= frozen
        assert len(gc.get_objects()) < 0.01 * before
        made_after = [[] for _ in range(10)]  # objects made later are still collected as usual
        assert any(o is made_after[0] for o in gc.get_objects())
        assert REGISTRY.get_sample_value("effnet_gc_frozen_objects", {"process": "test-heap", "variant": "none"}) == frozen
    finally:
        gc.unfreeze()


def test_collector_pauses_are_observed_per_process_and_generation():
    labels = {"process": "test-heap-watch", "variant": "b0", "generation": "2"}

    def count() -> float:
        return REGISTRY.get_sample_value("effnet_gc_pause_seconds_count", labels) or 0.0

    callback = watch_collector("test-heap-watch", "b0", flush_every_s=0.01)
    try:
        assert watch_collector("test-heap-watch", "b0") is None  # one callback per process name
        seen = count()
        gc.collect()
        gc.collect()
        deadline = time.monotonic() + 10
        while count() < seen + 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert count() >= seen + 2
        assert REGISTRY.get_sample_value("effnet_gc_pause_seconds_sum", labels) > 0
    finally:
        gc.callbacks.remove(callback)
