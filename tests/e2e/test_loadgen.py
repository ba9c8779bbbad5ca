"""The load generator (python -m loadtest): ghz's flags, ghz's JSON report, a real run.

The real runs go through the session stack (router, Redis, worker with the CPU
engine) and resolve the method by server reflection, as ghz does.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest import report
from loadtest.__main__ import run
from loadtest.options import OptionsError, normalise_call, parse_duration, parse_options
from loadtest.progress import Progress
from loadtest.runner import CallResult, RunResult, status_name
from tests.conftest import Stack

CHAT = "qwen_serve.api.v1.Inference/Chat"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
DATA_DIR = Path(__file__).resolve().parents[2] / "loadtest" / "data"


def chat_data(max_tokens: int = 6) -> str:
    return json.dumps(
        {
            "messages": [{"role": "ROLE_USER", "content": [{"text": "Hello"}]}],
            "enableThinking": False,
            "sampling": {"maxTokens": max_tokens, "temperature": 0},
        }
    )


# ------------------------------------------------------------------ flags


def test_ghz_flags_parse() -> None:
    options = parse_options(
        [
            "--call",
            "qwen_serve.api.v1.Inference.Chat",
            "-d",
            '[{"model": "a"}, {"model": "b"}]',
            "-m",
            '{"Authorization": "Bearer k"}',
            "-c",
            "8",
            "-n",
            "100",
            "-r",
            "50",
            "-z",
            "1m30s",
            "-t",
            "500ms",
            "--connections",
            "4",
            "-O",
            "pretty",
            "--insecure",
            "127.0.0.1:50051",
        ]
    )
    assert options.method_path == "/qwen_serve.api.v1.Inference/Chat"
    assert options.data == [{"model": "a"}, {"model": "b"}]
    assert options.metadata == {"authorization": "Bearer k"}
    assert (options.concurrency, options.total, options.rps) == (8, 100, 50)
    assert (options.duration_s, options.timeout_s) == (90.0, 0.5)
    assert (options.connections, options.format, options.insecure) == (4, "pretty", True)


def test_data_and_metadata_files() -> None:
    options = parse_options(
        [
            "--call",
            CHAT,
            "-D",
            str(DATA_DIR / "chat.json"),
            "-M",
            str(DATA_DIR / "metadata.json"),
            "h:1",
        ]
    )
    assert options.data[0]["sampling"]["maxTokens"] == 64
    assert "traceparent" in options.metadata
    assert (options.concurrency, options.total, options.format) == (50, 200, "summary")


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--call", "NoMethod", "h:1"], "--call"),
        (["--call", CHAT, "-d", "{not json", "h:1"], "-d"),
        (["--call", CHAT, "-d", "[1, 2]", "h:1"], "-d"),
        (["--call", CHAT, "-D", "/nonexistent.json", "h:1"], "-D"),
        (["--call", CHAT, "-m", '["a"]', "h:1"], "-m"),
        (["--call", CHAT, "-z", "10 parsecs", "h:1"], "-z"),
        (["--call", CHAT, "-c", "0", "h:1"], "-c"),
    ],
)
def test_bad_flags_name_the_flag(argv: list[str], flag: str) -> None:
    with pytest.raises(OptionsError, match=flag):
        parse_options(argv)


def test_call_and_duration_forms() -> None:
    assert normalise_call("/pkg.Svc/M") == "pkg.Svc/M"
    assert normalise_call("pkg.Svc.M") == "pkg.Svc/M"
    assert parse_duration("2m", "-z") == 120.0
    assert parse_duration("250ms", "-t") == 0.25
    assert parse_duration("3", "-z") == 3.0
    assert status_name(8) == "ResourceExhausted"
    assert status_name(1) == "Canceled"


# ------------------------------------------------------------------ report format


def _calls() -> list[CallResult]:
    calls = []
    for i in range(1, 11):
        call = CallResult(start_unix_ns=1_700_000_000_000_000_000 + i, latency_ns=i * 1_000_000)
        call.ttft_ns, call.tokens, call.messages = i * 100_000, 4, 5
        call.first_token_ns, call.last_token_ns = 0, 3_000_000
        call.gaps_ns = [1_000_000] * 3
        calls.append(call)
    calls[-1].status = "Unavailable"
    calls[-1].error = "rpc error: code = Unavailable desc = gone"
    return calls


def test_report_has_ghz_fields_in_nanoseconds() -> None:
    options = parse_options(["--call", CHAT, "-n", "10", "h:1"])
    doc = report.build(options, RunResult(_calls(), total_ns=2_000_000_000, timeline=[10, 30]))
    assert doc["count"] == 10 and doc["total"] == 2_000_000_000
    assert doc["rps"] == pytest.approx(5.0)
    assert doc["average"] == 5_500_000
    # fastest/slowest and the distribution cover successful calls only, as in ghz
    assert (doc["fastest"], doc["slowest"]) == (1_000_000, 9_000_000)
    assert [d["percentage"] for d in doc["latencyDistribution"]] == [10, 25, 50, 75, 90, 95, 99]
    assert doc["latencyDistribution"][2]["latency"] == 5_000_000
    assert doc["statusCodeDistribution"] == {"OK": 9, "Unavailable": 1}
    assert doc["errorDistribution"] == {"rpc error: code = Unavailable desc = gone": 1}
    assert len(doc["histogram"]) == 11
    assert sum(b["count"] for b in doc["histogram"]) == 9
    assert doc["histogram"][-1]["mark"] == pytest.approx(0.009)  # seconds
    assert len(doc["details"]) == 10 and doc["details"][0]["timestamp"].endswith("Z")
    assert all(isinstance(doc[k], int) for k in ("total", "average", "fastest", "slowest"))
    stream = doc["streaming"]
    assert stream["outputTokens"] == 40
    assert stream["timeToFirstToken"]["p50"] == 500_000
    assert stream["interTokenLatency"]["p99"] == 1_000_000
    assert stream["streamTokensPerSecond"]["p50"] == 1000
    assert stream["timeline"] == {"binMs": 100, "tokens": [10, 30]}


def test_formats() -> None:
    options = parse_options(["--call", CHAT, "h:1"])
    doc = report.build(options, RunResult(_calls(), total_ns=1_000_000_000))
    assert json.loads(report.render(doc, "json")) == json.loads(report.render(doc, "pretty"))
    text = report.render(doc, "summary")
    for heading in ("Summary:", "Latency distribution:", "Status code distribution:"):
        assert heading in text
    assert "Time to first token" in text


def test_progress_bar_counts_calls() -> None:
    out = io.StringIO()
    progress = Progress(total=4, duration_s=0, out=out)
    for result in _calls()[:2]:
        progress(result)
    progress.close()
    line = out.getvalue().strip().splitlines()[-1]
    assert "50.0%" in line and "2 calls" in line and "0 errors" in line


# ------------------------------------------------------------------ real runs


@pytest.mark.e2e
async def test_chat_load_through_the_stack(stack: Stack) -> None:
    options = parse_options(
        [
            "--call",
            CHAT,
            "-d",
            chat_data(),
            "-c",
            "2",
            "-n",
            "4",
            "-t",
            "120s",
            "-m",
            json.dumps({"traceparent": TRACEPARENT}),
            "--insecure",
            stack.target,
        ]
    )
    doc = await run(options)
    assert doc["options"]["metadata"] == {"traceparent": TRACEPARENT}
    assert doc["count"] == 4
    assert doc["statusCodeDistribution"] == {"OK": 4}, doc["errorDistribution"]
    stream = doc["streaming"]
    assert stream["timeToFirstToken"]["count"] == 4
    assert 4 <= stream["outputTokens"] <= 4 * 6
    assert stream["messages"] > 4  # Started, deltas, Finished, Usage


@pytest.mark.e2e
async def test_rejected_requests_are_counted_by_status(stack: Stack) -> None:
    bad = json.dumps({"messages": [], "sampling": {"maxTokens": 4}})
    options = parse_options(
        ["--call", CHAT, "-d", bad, "-c", "1", "-n", "2", "--insecure", stack.target]
    )
    doc = await run(options)
    assert doc["statusCodeDistribution"] == {"InvalidArgument": 2}
    (message,) = doc["errorDistribution"]
    assert message.startswith("rpc error: code = InvalidArgument desc = ") and "messages" in message
    assert doc["streaming"]["outputTokens"] == 0


@pytest.mark.e2e
async def test_unknown_method_is_refused_by_reflection(stack: Stack) -> None:
    options = parse_options(
        ["--call", "qwen_serve.api.v1.Inference/Nope", "--insecure", stack.target]
    )
    with pytest.raises(OptionsError, match="no method 'Nope'"):
        await run(options)


@pytest.mark.e2e
def test_cli_writes_ghz_json(stack: Stack, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    data = tmp_path / "generate.json"
    data.write_text(
        # several prompt tokens: a one-token prefill kills vLLM 0.32's CPU engine
        json.dumps(
            {"text": "Hello there, how are you?", "sampling": {"maxTokens": 3, "temperature": 0}}
        )
    )
    args = [sys.executable, "-m", "loadtest", "--insecure", "--call"]
    args += ["qwen_serve.api.v1.Inference.Generate", "-D", str(data), "-n", "2", "-c", "1"]
    args += ["-O", "json", "-o", str(out), stack.target]
    done = subprocess.run(args, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text())
    assert doc["count"] == 2 and doc["statusCodeDistribution"] == {"OK": 2}
    assert doc["options"]["call"] == "qwen_serve.api.v1.Inference.Generate"
    assert doc["streaming"]["outputTokens"] >= 2


def test_cli_bad_flag_exits_1() -> None:
    args = [sys.executable, "-m", "loadtest", "--call", CHAT, "-z", "forever", "h:1"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "-z" in done.stderr
