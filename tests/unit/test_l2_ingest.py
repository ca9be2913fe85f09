"""Bounded asynchronous ingestion queue."""

from __future__ import annotations

import threading
import time

from vllm_aibrix.core.l2.ingest import IngestItem, IngestQueue


class GatedSink:
    """A sink that blocks until released and records what it wrote."""

    def __init__(self, fail: bool = False) -> None:
        self.gate = threading.Event()
        self.batches: list[list[bytes]] = []
        self.fail = fail

    def __call__(self, batch: list[IngestItem]) -> int:
        self.gate.wait(10)
        if self.fail:
            raise RuntimeError("store down")
        self.batches.append([i.key for i in batch])
        return len(batch)


def item(i: int, size: int = 100) -> IngestItem:
    return IngestItem(i.to_bytes(4, "little"), bytes(size))


def balanced(q: IngestQueue) -> bool:
    s = q.stats
    blocks = s.written_blocks + s.failed_blocks + s.dropped_blocks + q.pending_blocks
    nbytes = s.written_bytes + s.failed_bytes + s.dropped_bytes + q.pending_bytes
    return blocks == s.submitted_blocks and nbytes == s.submitted_bytes


def test_items_are_written_in_batches_of_batch_size() -> None:
    sink = GatedSink()
    sink.gate.set()
    q = IngestQueue(sink, max_bytes=1 << 20, batch_size=4)
    try:
        sink.gate.clear()
        for i in range(9):
            q.offer(item(i))
        sink.gate.set()
        assert q.flush(5)
        written = [k for b in sink.batches for k in b]
        assert written == [item(i).key for i in range(9)]
        assert max(len(b) for b in sink.batches) <= 4
    finally:
        q.close()


def test_offer_never_blocks_while_the_sink_is_stuck() -> None:
    sink = GatedSink()
    q = IngestQueue(sink, max_bytes=1000, batch_size=2)
    try:
        t0 = time.perf_counter()
        for i in range(1000):
            q.offer(item(i))
        assert time.perf_counter() - t0 < 1.0
    finally:
        sink.gate.set()
        q.close()


def test_pending_bytes_never_exceed_the_bound() -> None:
    sink = GatedSink()
    q = IngestQueue(sink, max_bytes=1000, batch_size=2)
    try:
        for i in range(200):
            q.offer(item(i))
            assert q.pending_bytes <= 1000
    finally:
        sink.gate.set()
        q.close()


def test_when_full_the_oldest_pending_item_is_dropped() -> None:
    sink = GatedSink()
    q = IngestQueue(sink, max_bytes=500, batch_size=1)
    try:
        q.offer(item(0))  # taken by the writer, stuck in the sink
        time.sleep(0.1)
        for i in range(1, 10):
            q.offer(item(i))
        sink.gate.set()
        assert q.flush(5)
        written = [k for b in sink.batches for k in b]
        # In flight: 0. Room for 4 more: the newest four survive.
        assert written == [item(i).key for i in (0, 6, 7, 8, 9)]
        assert q.stats.dropped_blocks == 5
        assert q.stats.dropped_bytes == 500
    finally:
        q.close()


def test_item_larger_than_the_bound_is_dropped() -> None:
    sink = GatedSink()
    sink.gate.set()
    q = IngestQueue(sink, max_bytes=100, batch_size=1)
    try:
        assert not q.offer(item(0, size=101))
        assert q.stats.dropped_blocks == 1
    finally:
        q.close()


def test_flood_releases_every_byte_and_counters_add_up() -> None:
    sink = GatedSink()
    q = IngestQueue(sink, max_bytes=10_000, batch_size=8)
    try:

        def produce(base: int) -> None:
            for i in range(2000):
                q.offer(item(base * 10_000 + i))

        producers = [threading.Thread(target=produce, args=(b,)) for b in range(4)]
        for t in producers:
            t.start()
        time.sleep(0.05)
        sink.gate.set()  # writer starts draining while producers still flood
        for t in producers:
            t.join()
        assert q.flush(10)
        assert q.pending_bytes == 0
        assert q.pending_blocks == 0
        assert balanced(q)
        assert q.stats.submitted_blocks == 8000
        assert q.stats.dropped_blocks > 0  # the flood really went past the bound
    finally:
        q.close()


def test_failed_batches_are_counted_and_released() -> None:
    sink = GatedSink(fail=True)
    sink.gate.set()
    q = IngestQueue(sink, max_bytes=10_000, batch_size=4)
    try:
        for i in range(10):
            q.offer(item(i))
        assert q.flush(5)
        assert q.stats.failed_blocks == 10
        assert q.pending_bytes == 0
        assert balanced(q)
    finally:
        q.close()


def test_close_drops_what_cannot_be_written_and_stops_the_writer() -> None:
    sink = GatedSink()
    q = IngestQueue(sink, max_bytes=10_000, batch_size=1)
    for i in range(5):
        q.offer(item(i))
    q.close(timeout=0.1)
    sink.gate.set()
    q._thread.join(2)
    assert not q._thread.is_alive()
    assert not q.offer(item(99))
    assert balanced(q)
