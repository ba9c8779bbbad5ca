"""Delta coalescing on the worker."""

from __future__ import annotations

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.deltas import merge_into


def _delta(
    index: int, content: str = "", reasoning: str = "", ids: tuple[int, ...] = ()
) -> pb.ChatEvent:
    return pb.ChatEvent(
        delta=pb.Delta(index=index, content=content, reasoning=reasoning, token_ids=list(ids))
    )


def test_consecutive_deltas_of_one_choice_merge() -> None:
    last = _delta(0, "Hel", ids=(1,))
    assert merge_into(last, _delta(0, "lo", "hm", ids=(2, 3)))
    assert last.delta.content == "Hello" and last.delta.reasoning == "hm"
    assert list(last.delta.token_ids) == [1, 2, 3]


def test_other_choices_and_kinds_do_not_merge() -> None:
    last = _delta(0, "a")
    assert not merge_into(last, _delta(1, "b"))
    assert not merge_into(last, pb.ChatEvent(finished=pb.Finished(index=0)))
    assert last.delta.content == "a"


async def test_event_queue_merges_waiting_deltas_and_keeps_order() -> None:
    from qwen_serve.deltas import EventQueue

    queue = EventQueue()
    queue.put(pb.ChatEvent(started=pb.Started(request_id="r")))
    queue.put(_delta(0, "a", ids=(1,)))
    queue.put(_delta(0, "b", ids=(2,)))
    queue.put(_delta(1, "x", ids=(9,)))
    queue.put(pb.ChatEvent(finished=pb.Finished(index=0)))
    kinds = []
    while len(queue):
        event = await queue.get()
        kinds.append(event.WhichOneof("event"))
        if event.HasField("delta") and event.delta.index == 0:
            assert event.delta.content == "ab" and list(event.delta.token_ids) == [1, 2]
    assert kinds == ["started", "delta", "delta", "finished"]
