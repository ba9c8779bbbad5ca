"""Stream one chat from a running router to the terminal.

``python -m qwen_serve.sample_chat --target 127.0.0.1:50051 "Hello"``. Images
(``--image cat.png``, up to the server's limit), tools (``--tools tools.json``: a
JSON list of ``{"name", "description", "parameters"}`` or OpenAI function tools),
``--force-tool-call [NAME]`` and a ``--regex`` output constraint are optional. The
tiny development model has random weights, so its words are meaningless; the point
is the typed event stream (reasoning, content, tool-call fragments, complete calls).
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from qwen_serve.api.v1 import serve_pb2 as pb
from qwen_serve.api.v1 import serve_pb2_grpc

DIM, BOLD, RESET = "\033[2m", "\033[1m", "\033[0m"


def load_tools(path: Path) -> list[pb.Tool]:
    """Tools from a JSON file: plain ``{"name", ...}`` objects or OpenAI function tools."""
    tools = []
    for item in json.loads(path.read_text()):
        spec: dict[str, Any] = item.get("function", item)
        tools.append(
            pb.Tool(
                name=spec["name"],
                description=spec.get("description", ""),
                parameters_json_schema=json.dumps(spec.get("parameters", {"type": "object"})),
            )
        )
    return tools


def image_part(path: Path) -> pb.ContentPart:
    """An image file as a content part (bytes plus the MIME type its name suggests)."""
    mime = mimetypes.guess_type(path.name)[0] or ""
    return pb.ContentPart(image=pb.Image(data=path.read_bytes(), mime_type=mime))


def tool_choice(force: str | None) -> pb.ToolChoice:
    """AUTO unless forced: REQUIRED for any tool, or the named function."""
    if force is None:
        return pb.ToolChoice(mode=pb.ToolChoice.MODE_AUTO)
    if not force:
        return pb.ToolChoice(mode=pb.ToolChoice.MODE_REQUIRED)
    return pb.ToolChoice(mode=pb.ToolChoice.MODE_FUNCTION, function_name=force)


def build_request(
    prompt: str,
    max_tokens: int,
    think: bool,
    images: Sequence[Path] = (),
    tools: Sequence[pb.Tool] = (),
    force: str | None = None,
    regex: str | None = None,
    temperature: float = 0.7,
) -> pb.ChatRequest:
    """A one-turn chat request."""
    content = [pb.ContentPart(text=prompt), *(image_part(p) for p in images)]
    request = pb.ChatRequest(
        messages=[
            pb.Message(role=pb.ROLE_SYSTEM, content=[pb.ContentPart(text="You are concise.")]),
            pb.Message(role=pb.ROLE_USER, content=content),
        ],
        tools=tools,
        enable_thinking=think,
        sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=temperature),
        client_request_id="sample-chat",
    )
    if tools:
        request.tool_choice.CopyFrom(tool_choice(force))
    if regex:
        request.structured_output.regex = regex
    return request


def _render_delta(delta: pb.Delta, out: list[str]) -> None:
    if delta.reasoning:
        print(f"{DIM}{delta.reasoning}{RESET}", end="", flush=True)
    if delta.content:
        out.append(delta.content)
        print(delta.content, end="", flush=True)
    for call in delta.tool_calls:
        if call.name:
            print(f"\n{BOLD}tool call {call.index}{RESET} {call.name} ({call.id}) ", end="")
        print(call.arguments_fragment, end="", flush=True)


def render(event: pb.ChatEvent, out: list[str]) -> None:
    """Print one event."""
    kind = event.WhichOneof("event")
    if kind == "started":
        print(f"{BOLD}started{RESET} {event.started.request_id} model={event.started.model}")
    elif kind == "delta":
        _render_delta(event.delta, out)
    elif kind == "finished":
        finished = event.finished
        reason = pb.FinishReason.Name(finished.reason)
        print(f"\n{BOLD}finished{RESET} choice {finished.index}: {reason}")
        for call in finished.tool_calls:
            print(f"  {BOLD}call{RESET} {call.name}({call.arguments_json}) id={call.id}")
    elif kind == "usage":
        u = event.usage
        print(
            f"{BOLD}usage{RESET} prompt={u.prompt_tokens} completion={u.completion_tokens} "
            f"reasoning={u.reasoning_tokens} cached={u.cached_tokens}"
        )
    elif kind == "error":
        print(f"\n{BOLD}error{RESET} {event.error.code}: {event.error.message}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m qwen_serve.sample_chat")
    parser.add_argument("prompt", nargs="?", default="Write a haiku about gRPC streams.")
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 is greedy")
    parser.add_argument("--no-think", action="store_true")
    parser.add_argument("--image", action="append", type=Path, default=[], help="image file")
    parser.add_argument("--tools", type=Path, help="JSON file with a list of tools")
    parser.add_argument(
        "--force-tool-call",
        nargs="?",
        const="",
        metavar="NAME",
        help="make the model call a tool (NAME: that function)",
    )
    parser.add_argument("--regex", help="constrain the output to this regular expression")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI; returns the exit code."""
    args = parse_args(argv)
    tools = load_tools(args.tools) if args.tools else []
    request = build_request(
        args.prompt,
        args.max_tokens,
        not args.no_think,
        args.image,
        tools,
        args.force_tool_call,
        args.regex,
        args.temperature,
    )
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
