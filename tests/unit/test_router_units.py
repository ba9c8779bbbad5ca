"""Router pieces that need no network: validation, job building, status mapping."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2

from qwen_serve import request_rules
from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.errors import RESOURCE_EXHAUSTED, RequestError
from qwen_serve.queue.codec import WorkerStatus
from router import errors, jobs, validation
from router.cluster import ClusterView
from tests.support.calls import chat, user


def _field_of(request: pb.ChatRequest) -> str:
    with pytest.raises(RequestError) as info:
        validation.check_chat(request)
    return info.value.field


def test_valid_chat_passes() -> None:
    request = chat("hi")
    request.tools.add(name="get_weather", parameters_json_schema='{"type": "object"}')
    request.tool_choice.mode = pb.ToolChoice.MODE_FUNCTION
    request.tool_choice.function_name = "get_weather"
    validation.check_chat(request)


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r.tools.add(name="bad name!"), "tools[0].name"),
        (
            lambda r: r.tools.add(name="f", parameters_json_schema="[1]"),
            "tools[0].parameters_json_schema",
        ),
        (lambda r: setattr(r.tool_choice, "mode", pb.ToolChoice.MODE_REQUIRED), "tool_choice"),
        (
            lambda r: r.structured_output.__setattr__("regex", "(unclosed"),
            "structured_output.regex",
        ),
        (lambda r: setattr(r.sampling, "top_p", 0.0), "sampling.top_p"),
        (lambda r: r.sampling.stop.append(""), "sampling.stop"),
        (lambda r: setattr(r, "chat_template_kwargs_json", "{"), "chat_template_kwargs_json"),
        (
            lambda r: r.messages.append(
                pb.Message(role=pb.ROLE_TOOL, content=[pb.ContentPart(text="x")])
            ),
            "messages[1].tool_call_id",
        ),
    ],
)
def test_invalid_fields_are_named(mutate: object, field: str) -> None:
    request = chat("hi")
    mutate(request)  # type: ignore[operator]
    assert _field_of(request) == field


def test_model_limits() -> None:
    info = pb.ModelInfo(served_model_name="m", max_context_tokens=100, max_images_per_prompt=2)
    validation.check_against_model("", pb.SamplingParams(max_tokens=10), 2, info)
    with pytest.raises(RequestError, match=r"sampling\.max_tokens"):
        validation.check_against_model("m", pb.SamplingParams(max_tokens=100), 0, info)
    with pytest.raises(RequestError, match="messages"):
        validation.check_against_model("m", pb.SamplingParams(), 3, info)
    with pytest.raises(RequestError, match="model"):
        validation.check_against_model("other", pb.SamplingParams(), 0, info)


def test_images_are_counted_over_messages() -> None:
    image = pb.ContentPart(image=pb.Image(data=b"x", mime_type="image/png"))
    messages = [pb.Message(role=pb.ROLE_USER, content=[image, image]), user("x")]
    assert validation.count_images(messages) == 2


def test_make_job_carries_request_deadline_and_trace() -> None:
    request = chat("hi")
    job = jobs.make_job(
        request,
        router_id="r",
        reply_stream="s",
        deadline_unix_ms=123,
        trace=jobs.trace_context([("traceparent", "00-ab-cd-01"), ("authorization", "x")]),
    )
    assert job.chat == request and job.deadline_unix_ms == 123
    assert dict(job.trace_context) == {"traceparent": "00-ab-cd-01"}
    assert request_rules.REQUEST_ID_RE.fullmatch(job.request_id)
    other = jobs.make_job(request, router_id="r", reply_stream="s", deadline_unix_ms=0, trace={})
    assert other.request_id != job.request_id
    assert jobs.deadline_ms(None) == 0


def test_overload_status_carries_retry_info() -> None:
    exc = RequestError(RESOURCE_EXHAUSTED, "", "full", retryable=True, retry_after_ms=1500)
    status = errors.to_status(exc)
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("retry-after-ms", "1500") in status.trailing_metadata
    raw = dict(status.trailing_metadata)["grpc-status-details-bin"]
    from google.rpc import status_pb2

    parsed = status_pb2.Status.FromString(raw)
    retry = error_details_pb2.RetryInfo()
    assert parsed.details[0].Unpack(retry)
    assert retry.retry_delay.seconds == 1 and retry.retry_delay.nanos == 500_000_000


def test_the_model_comes_from_the_freshest_worker_that_reports_one() -> None:
    serving = WorkerStatus(worker_id="w1", heartbeat_unix_ms=1_000)
    serving.model.served_model_name, serving.model.max_context_tokens = "qwen", 4096
    # A fresher status without a model (another release, a consumer that only claims)
    # must not set the limits: a context of 0 tokens would refuse every request.
    bare = WorkerStatus(worker_id="w2", heartbeat_unix_ms=2_000)
    info = ClusterView(workers=[serving, bare]).model()
    assert info is not None and info.max_context_tokens == 4096 and info.live_workers == 2
    assert ClusterView(workers=[bare]).model() is None
