"""vLLM output -> API events (worker/events.py) with vLLM's real qwen3 / qwen3_coder parsers.

The tokenizer is the tiny model's (``<think>``, ``</think>``, ``<tool_call>`` are single
tokens there, as in Qwen3.5). No engine is started: ``CompletionOutput`` deltas are
made from tokenized text and cut into chunks of several sizes, so tags fall across
delta boundaries.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from vllm.logprobs import Logprob
from vllm.outputs import CompletionOutput
from vllm.tokenizers import get_tokenizer

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import INTERNAL, RequestError
from worker.choice_stream import ChoiceStream
from worker.event_parts import ToolCallState, complete_tool_calls, finish_reason, token_logprobs
from worker.events import TOOL_CALL_END, RequestStream, request_stream
from worker.vllm_boundary import ChatCompletionRequest, ReasoningCounter, parser_class

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]
CALL_PARIS = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "</function>\n</tool_call>"
)
CALL_ROME = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nRome\n</parameter>\n"
    "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>"
)
CHUNKS = [1, 2, 3, 5, 8, 1000]


@dataclass
class Env:
    """The tiny tokenizer and vLLM's composed qwen3 + qwen3_coder parser class."""

    tokenizer: Any
    parser_cls: Any

    def prompt_ids(self, thinking: bool) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": "weather?"}],
            tools=TOOLS,
            add_generation_prompt=True,
            tokenize=False,
            enable_thinking=thinking,
        )
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def choice(
        self, thinking: bool = True, tool_choice: Any = "auto", index: int = 0
    ) -> ChoiceStream:
        kwargs = {} if thinking else {"enable_thinking": False}
        request = ChatCompletionRequest(
            messages=[{"role": "user", "content": "weather?"}],
            tools=TOOLS,
            tool_choice=tool_choice,
            chat_template_kwargs=kwargs,
            stream=True,
        )
        parser = self.parser_cls(self.tokenizer, request.tools, chat_template_kwargs=kwargs)
        request = parser.adjust_request(request)
        end_id = self.tokenizer.convert_tokens_to_ids(TOOL_CALL_END)
        return ChoiceStream(
            index, parser, request, call_end_id=end_id, reasoning=ReasoningCounter(parser)
        )


@pytest.fixture(scope="module")
def env(tiny_model: Path) -> Env:
    tokenizer = get_tokenizer(str(tiny_model))
    parser_cls = parser_class("qwen3_coder", "qwen3", True, "tiny", tokenizer)
    return Env(tokenizer, parser_cls)


def outputs(
    env: Env, text: str, sizes: Iterator[int], reason: str = "stop", index: int = 0
) -> list[CompletionOutput]:
    """``text`` as DELTA outputs of ``sizes`` tokens each (the last one finished)."""
    ids = env.tokenizer.encode(text, add_special_tokens=False)
    out = []
    start = 0
    while start < len(ids):
        part = ids[start : start + next(sizes)]
        start += len(part)
        out.append(
            CompletionOutput(
                index=index,
                text=env.tokenizer.decode(part, skip_special_tokens=False),
                token_ids=part,
                cumulative_logprob=None,
                logprobs=None,
                finish_reason=reason if start >= len(ids) else None,
            )
        )
    return out


def completion(
    text: str,
    ids: list[int],
    finish: str | None = None,
    stop: int | str | None = None,
    logprobs: Any = None,
) -> CompletionOutput:
    """A CompletionOutput of choice 0."""
    return CompletionOutput(
        index=0,
        text=text,
        token_ids=ids,
        cumulative_logprob=None,
        logprobs=logprobs,
        finish_reason=finish,
        stop_reason=stop,
    )


def every(size: int) -> Iterator[int]:
    while True:
        yield size


def shuffled(seed: int) -> Iterator[int]:
    rng = random.Random(seed)
    while True:
        yield rng.randint(1, 6)


@dataclass
class Result:
    """The events of one choice, folded."""

    events: list[pb.ChatEvent]
    reasoning: str = ""
    content: str = ""
    token_ids: list[int] = field(default_factory=list)
    fragments: list[pb.ToolCallDelta] = field(default_factory=list)

    def __post_init__(self) -> None:
        for event in self.events:
            if event.HasField("delta"):
                self.reasoning += event.delta.reasoning
                self.content += event.delta.content
                self.token_ids += event.delta.token_ids
                self.fragments += event.delta.tool_calls

    @property
    def finished(self) -> pb.Finished:
        (finished,) = [e.finished for e in self.events if e.HasField("finished")]
        return finished

    def arguments(self, index: int) -> str:
        return "".join(f.arguments_fragment for f in self.fragments if f.index == index)


def run(env: Env, choice: ChoiceStream, outs: Sequence[CompletionOutput], thinking: bool) -> Result:
    prompt = env.prompt_ids(thinking)
    events = [event for out in outs for event in choice.feed(out, prompt)]
    assert events[-1].HasField("finished")
    return Result(events)


def calls(finished: pb.Finished) -> list[tuple[str, dict[str, Any]]]:
    return [(c.name, json.loads(c.arguments_json)) for c in finished.tool_calls]


# ------------------------------------------------------------------ parser streams


@pytest.mark.parametrize("size", CHUNKS)
def test_reasoning_then_tool_call(env: Env, size: int) -> None:
    choice = env.choice()
    result = run(env, choice, outputs(env, "hmm\n</think>\n\n" + CALL_PARIS, every(size)), True)
    assert result.reasoning == "hmm\n"
    assert result.content == ""
    assert result.finished.reason == pb.FINISH_REASON_TOOL_CALLS
    assert calls(result.finished) == [("get_weather", {"city": "Paris"})]
    first = result.fragments[0]
    assert (first.index, first.name) == (0, "get_weather")
    assert first.id and first.id == result.finished.tool_calls[0].id
    assert all(not f.id and not f.name for f in result.fragments[1:])
    assert result.arguments(0) == result.finished.tool_calls[0].arguments_json
    assert len(result.token_ids) == len(choice.token_ids)
    assert choice.reasoning_tokens() == len(env.tokenizer.encode("hmm\n"))


@pytest.mark.parametrize("seed", range(6))
def test_tags_split_at_random_delta_boundaries(env: Env, seed: int) -> None:
    text = "let me see\n</think>\n\nSure.\n\n" + CALL_PARIS + "\n" + CALL_ROME
    result = run(env, env.choice(), outputs(env, text, shuffled(seed)), True)
    assert result.reasoning == "let me see\n"
    assert result.content.strip() == "Sure."
    assert calls(result.finished) == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Rome", "days": 2}),  # coerced to the schema's integer
    ]
    assert [f.index for f in result.fragments if f.name] == [0, 1]
    assert json.loads(result.arguments(1)) == {"city": "Rome", "days": 2}


def test_tool_call_inside_reasoning_is_kept(env: Env) -> None:
    """vLLM issue 39056: a tool call opened before ``</think>`` ends the reasoning.

    vLLM 0.32's qwen3 grammar has the REASONING + ``<tool_call>`` transition, so the call
    is parsed (older releases streamed it as reasoning and lost it).
    """
    for size in CHUNKS:
        text = "I will call it " + CALL_PARIS.replace("Paris", "Oslo")
        result = run(env, env.choice(), outputs(env, text, every(size)), True)
        assert result.reasoning == "I will call it "
        assert result.content == ""
        assert calls(result.finished) == [("get_weather", {"city": "Oslo"})]
        assert result.finished.reason == pb.FINISH_REASON_TOOL_CALLS


@pytest.mark.parametrize("seed", range(4))
def test_several_calls_starting_inside_reasoning(env: Env, seed: int) -> None:
    text = "two at once " + CALL_PARIS + "\n" + CALL_ROME
    result = run(env, env.choice(), outputs(env, text, shuffled(seed)), True)
    assert result.reasoning == "two at once "
    assert calls(result.finished) == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Rome", "days": 2}),
    ]
    assert [(f.index, f.name) for f in result.fragments if f.id] == [
        (0, "get_weather"),
        (1, "get_weather"),
    ]


def test_thinking_disabled_is_all_content(env: Env) -> None:
    result = run(env, env.choice(thinking=False), outputs(env, "Answer: 42", every(2)), False)
    assert (result.reasoning, result.content) == ("", "Answer: 42")
    assert result.finished.reason == pb.FINISH_REASON_STOP
    assert not result.finished.tool_calls


def test_tool_call_with_thinking_disabled(env: Env) -> None:
    result = run(env, env.choice(thinking=False), outputs(env, CALL_PARIS, every(3)), False)
    assert (result.reasoning, result.content) == ("", "")
    assert calls(result.finished) == [("get_weather", {"city": "Paris"})]


def test_unterminated_reasoning(env: Env) -> None:
    choice = env.choice()
    result = run(env, choice, outputs(env, "thinking forever", every(2), "length"), True)
    assert result.reasoning == "thinking forever"
    assert result.finished.reason == pb.FINISH_REASON_LENGTH
    assert choice.reasoning_tokens() == len(choice.token_ids)


def test_truncated_tool_call_is_streamed_but_not_finished(env: Env) -> None:
    text = "hmm\n</think>\n\n" + CALL_PARIS[: CALL_PARIS.index("Paris") + 3]
    result = run(env, env.choice(), outputs(env, text, every(2), "length"), True)
    assert result.fragments[0].name == "get_weather"
    assert result.arguments(0).startswith('{"city": "Par')
    assert result.finished.reason == pb.FINISH_REASON_LENGTH
    assert not result.finished.tool_calls


def test_call_cut_by_max_tokens_is_not_reported_complete(env: Env) -> None:
    """vLLM's parser closes a call left open at the end (arguments "{}"); it never reached
    ``</tool_call>``, so Finished leaves it out."""
    text = "hmm\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=ci"
    for size in CHUNKS:
        result = run(env, env.choice(), outputs(env, text, every(size), "length"), True)
        assert [(f.index, f.name) for f in result.fragments if f.name] == [(0, "get_weather")]
        assert result.finished.reason == pb.FINISH_REASON_LENGTH
        assert not result.finished.tool_calls


def test_closed_calls_survive_a_cut_and_the_open_one_is_dropped(env: Env) -> None:
    text = "hmm\n</think>\n\n" + CALL_PARIS + "\n" + CALL_ROME[: CALL_ROME.index("Rome")]
    result = run(env, env.choice(), outputs(env, text, shuffled(3), "length"), True)
    assert [f.name for f in result.fragments if f.name] == ["get_weather", "get_weather"]
    assert calls(result.finished) == [("get_weather", {"city": "Paris"})]
    assert result.finished.reason == pb.FINISH_REASON_LENGTH


def test_stop_string_inside_a_call_cuts_it(env: Env) -> None:
    outs = outputs(env, "hmm\n</think>\n\n" + CALL_PARIS[:60], every(3))
    outs[-1].stop_reason = "Paris"
    result = run(env, env.choice(), outs, True)
    assert result.finished.matched_stop == "Paris"
    assert result.finished.reason == pb.FINISH_REASON_STOP
    assert not result.finished.tool_calls


def test_tool_choice_none_keeps_markup_out_of_tool_calls(env: Env) -> None:
    result = run(
        env,
        env.choice(tool_choice="none"),
        outputs(env, "a\n</think>\n\n" + CALL_PARIS, every(1)),
        True,
    )
    assert not result.fragments
    assert result.finished.reason == pb.FINISH_REASON_STOP
    assert not result.finished.tool_calls


def test_abort(env: Env) -> None:
    result = run(env, env.choice(), outputs(env, "partial", every(1), "abort"), True)
    assert result.finished.reason == pb.FINISH_REASON_ABORT


def test_without_a_parser_text_is_content(env: Env) -> None:
    choice = ChoiceStream(0, stop_token_ids=frozenset({7}))
    outs = outputs(env, "raw <think> text", every(2))
    outs[-1].stop_reason = "STOP"
    result = Result([e for out in outs for e in choice.feed(out, None)])
    assert (result.reasoning, result.content) == ("", "raw <think> text")
    assert result.finished.matched_stop == "STOP"
    assert choice.reasoning_tokens() == 0


def test_only_requested_stop_token_ids_are_reported() -> None:
    def finish(stop_reason: int) -> pb.Finished:
        choice = ChoiceStream(0, stop_token_ids=frozenset({7}))
        out = completion("", [stop_reason], "stop", stop_reason)
        (_, event) = choice.feed(out, None)
        return event.finished

    assert finish(7).matched_stop_token_id == 7
    assert not finish(3000).HasField("matched_stop_token_id")  # a generation-config EOS


def test_parser_failure_falls_back_to_text() -> None:
    class Broken:
        def parse_delta(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("boom")

    choice = ChoiceStream(0, Broken())
    events = choice.feed(completion("hi", [1], "stop"), [0])
    assert events[0].delta.content == "hi"


# ------------------------------------------------------------------ pure functions


def test_token_logprobs_by_rank() -> None:
    step = {
        5: Logprob(-3.0, rank=9, decoded_token="five"),
        1: Logprob(-0.5, rank=1, decoded_token="one"),
        2: Logprob(-1.0, rank=2, decoded_token="two"),
    }
    (item,) = token_logprobs([5], [step], top=2)
    assert (item.token_id, item.token, item.logprob) == (5, "five", -3.0)
    assert [(t.token_id, t.token, t.logprob) for t in item.top] == [
        (1, "one", -0.5),
        (2, "two", -1.0),
    ]
    (plain,) = token_logprobs([1], [{1: Logprob(-0.5, rank=1, decoded_token="one")}], top=0)
    assert (plain.token, plain.logprob, list(plain.top)) == ("one", -0.5, [])


def test_choice_stream_logprobs() -> None:
    choice = ChoiceStream(0, top_logprobs=1)
    steps = [{4: Logprob(-0.25, rank=1, decoded_token="x")}]
    (delta, _) = choice.feed(completion("x", [4], "length", logprobs=steps), None)
    assert [(lp.token_id, lp.logprob, len(lp.top)) for lp in delta.delta.logprobs] == [
        (4, -0.25, 1)
    ]


def test_finish_reasons() -> None:
    assert finish_reason("stop", False) == pb.FINISH_REASON_STOP
    assert finish_reason("stop", True) == pb.FINISH_REASON_TOOL_CALLS
    assert finish_reason("length", True) == pb.FINISH_REASON_LENGTH
    assert finish_reason("abort", False) == pb.FINISH_REASON_ABORT
    assert finish_reason("repetition", False) == pb.FINISH_REASON_STOP
    with pytest.raises(RequestError) as excinfo:
        finish_reason("error", False)
    assert (excinfo.value.code, excinfo.value.retryable) == (INTERNAL, True)


def test_complete_tool_calls_drop_partial_ones() -> None:
    state = {
        1: ToolCallState("b", "g", '{"x": 1}'),
        0: ToolCallState("a", "f", ""),
        2: ToolCallState("c", "h", '{"x": '),
    }
    assert [(c.id, c.name, c.arguments_json) for c in complete_tool_calls(state)] == [
        ("a", "f", "{}"),
        ("b", "g", '{"x": 1}'),
    ]


@dataclass
class FakeRequestOutput:
    """The fields of ``vllm.outputs.RequestOutput`` that are read."""

    outputs: list[CompletionOutput]
    prompt_token_ids: list[int] | None = field(default_factory=lambda: [1, 2, 3])
    num_cached_tokens: int | None = 2


def test_request_stream_with_two_choices(env: Env) -> None:
    stream = RequestStream([env.choice(index=0), env.choice(index=1)])
    first = outputs(env, "a\n</think>\n\nfine", every(2), index=0)
    second = outputs(env, "b\n</think>\n\n" + CALL_PARIS, every(4), index=1)
    events: list[pb.ChatEvent] = []
    for k in range(max(len(first), len(second))):
        batch = [outs[k] for outs in (first, second) if k < len(outs)]
        events += stream.feed(FakeRequestOutput(batch))
    (usage_event,) = stream.close()
    finished = {e.finished.index: e.finished.reason for e in events if e.HasField("finished")}
    assert finished == {0: pb.FINISH_REASON_STOP, 1: pb.FINISH_REASON_TOOL_CALLS}
    usage = usage_event.usage
    assert usage.prompt_tokens == 3
    assert usage.cached_tokens == 2
    assert usage.completion_tokens == sum(len(o.token_ids) for o in first + second)
    reasoning = [env.tokenizer.encode(t, add_special_tokens=False) for t in ("a\n", "b\n")]
    assert usage.reasoning_tokens == sum(len(ids) for ids in reasoning)
    assert stream.close() == []


def test_request_stream_close_aborts_open_choices() -> None:
    stream = RequestStream([ChoiceStream(0)])
    stream.feed(FakeRequestOutput([completion("x", [1])]))
    finished, usage = stream.close()
    assert finished.finished.reason == pb.FINISH_REASON_ABORT
    assert usage.usage.completion_tokens == 1


def test_request_stream_builder() -> None:
    sampling = pb.SamplingParams(logprobs=True, stop_token_ids=[5])
    stream = request_stream([None, None], None, sampling, 9)
    assert [c.index for c in stream.choices] == [0, 1]
    assert {(c.top_logprobs, c.stop_token_ids, c.call_end_id) for c in stream.choices} == {
        (0, frozenset({5}), 9)
    }
    plain = request_stream([None], None, pb.SamplingParams(top_logprobs=3), None)
    assert plain.choices[0].top_logprobs is None  # top_logprobs needs logprobs
