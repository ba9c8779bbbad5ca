"""Stream one chat from a running router to the terminal.

``python -m qwen_serve.sample_chat --target 127.0.0.1:50051 "Hello"``. The
tiny development model has random weights, so its words are meaningless;
the point is the typed event stream.
"""

from __future__ import annotations

import argparse
import sys
import time

import grpc

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.api.v1 import serve_pb2_grpc

DIM, BOLD, RESET = "\033[2m", "\033[1m", "\033[0m"


def build_request(prompt: str, max_tokens: int, think: bool) -> pb.ChatRequest:
    """A one-turn chat request."""
    return pb.ChatRequest(
        messages=[
            pb.Message(role=pb.ROLE_SYSTEM, content=[pb.ContentPart(text="You are concise.")]),
            pb.Message(role=pb.ROLE_USER, content=[pb.ContentPart(text=prompt)]),
        ],
        enable_thinking=think,
        sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.7),
        client_request_id="sample-chat",
    )


def render(event: pb.ChatEvent, out: list[str]) -> None:
    """Print one event."""
    kind = event.WhichOneof("event")
    if kind == "started":
        print(f"{BOLD}started{RESET} {event.started.request_id} model={event.started.model}")
    elif kind == "delta":
        if event.delta.reasoning:
            print(f"{DIM}{event.delta.reasoning}{RESET}", end="", flush=True)
        if event.delta.content:
            out.append(event.delta.content)
            print(event.delta.content, end="", flush=True)
        for call in event.delta.tool_calls:
            print(f"\n{BOLD}tool call{RESET} {call.name} {call.arguments_fragment}", end="")
    elif kind == "finished":
        reason = pb.FinishReason.Name(event.finished.reason)
        print(f"\n{BOLD}finished{RESET} choice {event.finished.index}: {reason}")
    elif kind == "usage":
        u = event.usage
        print(
            f"{BOLD}usage{RESET} prompt={u.prompt_tokens} completion={u.completion_tokens} "
            f"reasoning={u.reasoning_tokens} cached={u.cached_tokens}"
        )
    elif kind == "error":
        print(f"\n{BOLD}error{RESET} {event.error.code}: {event.error.message}")


def main(argv: list[str] | None = None) -> int:
    """CLI; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m qwen_serve.sample_chat")
    parser.add_argument("prompt", nargs="?", default="Write a haiku about gRPC streams.")
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--no-think", action="store_true")
    args = parser.parse_args(argv)
    request = build_request(args.prompt, args.max_tokens, not args.no_think)
    with grpc.insecure_channel(args.target) as channel:
        stub = serve_pb2_grpc.InferenceStub(channel)  # type: ignore[no-untyped-call]
        start, out = time.monotonic(), list[str]()
        try:
            for event in stub.Chat(request, timeout=120):
                render(event, out)
        except grpc.RpcError as exc:
            print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        print(f"{DIM}{time.monotonic() - start:.2f} s{RESET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
