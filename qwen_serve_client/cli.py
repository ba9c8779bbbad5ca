"""The ``qwen-serve`` command line (also ``python -m qwen_serve_client``).

::

    qwen-serve chat "Describe this picture" --image cat.png --no-think
    qwen-serve chat --tools tools.json "Weather in Paris?"
    qwen-serve chat -i                      # interactive; /reset, /exit
    qwen-serve generate --token-ids 1,2,3 --max-tokens 8
    qwen-serve models
    qwen-serve health

Exit codes: 0 ok; 1 the stream failed after acceptance (Error event) or an
unexpected status; 2 invalid request or usage; 3 unavailable (cannot connect,
no worker); 4 authentication; 5 deadline exceeded; 6 overloaded; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from qwen_serve_client import errors
from qwen_serve_client.connection import DEFAULT_TARGET, ENV_API_KEY, ENV_TARGET, RetryPolicy
from qwen_serve_client.content import image, system, user
from qwen_serve_client.render import Renderer
from qwen_serve_client.requests import PRIORITIES, Sampling
from qwen_serve_client.result import ChatResult
from qwen_serve_client.sync import ChatStream, Client
from qwen_serve_client.tools import tools_from_file

EXIT_CODES: dict[type[errors.QwenServeError], int] = {
    errors.InvalidRequest: 2,
    errors.NotFound: 2,
    errors.ConnectError: 3,
    errors.AuthError: 4,
    errors.DeadlineExceeded: 5,
    errors.Overloaded: 6,
}

SAMPLING_FLAGS: dict[str, type] = {
    "max_tokens": int,
    "min_tokens": int,
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "presence_penalty": float,
    "frequency_penalty": float,
    "repetition_penalty": float,
    "seed": int,
    "n": int,
}


def _common(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("connection")
    g.add_argument(
        "--target",
        default=os.environ.get(ENV_TARGET, DEFAULT_TARGET),
        help=f"router host:port (${ENV_TARGET}, default {DEFAULT_TARGET})",
    )
    g.add_argument(
        "--api-key",
        default=os.environ.get(ENV_API_KEY),
        help=f"sent as 'authorization: Bearer KEY' (${ENV_API_KEY})",
    )
    g.add_argument("--tls", action="store_true", help="use TLS (system roots unless --ca-cert)")
    g.add_argument("--ca-cert", type=Path, help="PEM roots to trust (implies --tls)")
    g.add_argument("--client-cert", type=Path, help="PEM client certificate (mutual TLS)")
    g.add_argument("--client-key", type=Path, help="PEM client key (mutual TLS)")
    g.add_argument("--server-name", help="TLS name to verify instead of the target's host")
    g.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds")
    g.add_argument(
        "--retries",
        type=int,
        default=2,
        help="retries of UNAVAILABLE/RESOURCE_EXHAUSTED before any event",
    )
    parser.add_argument("--json", action="store_true", help="print JSON (one object per event)")
    parser.add_argument("--color", choices=["auto", "always", "never"], default="auto")


def _request_flags(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling (unset: the model's generation config)")
    for name, kind in SAMPLING_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        g.add_argument(flag, dest=name, type=kind, metavar=kind.__name__.upper())
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", default=None)
    c = parser.add_argument_group("structured output").add_mutually_exclusive_group()
    c.add_argument("--json-schema", metavar="FILE|JSON", help="JSON Schema the output follows")
    c.add_argument("--regex", help="regular expression the whole output matches")
    c.add_argument("--choice", action="append", help="allowed output (repeatable)")
    c.add_argument("--json-object", action="store_true", default=None, help="any JSON object")
    parser.add_argument("--model", default="", help="served model name (default: the default)")
    parser.add_argument("--priority", choices=sorted(PRIORITIES))
    parser.add_argument("--request-id", default="", help="your id, echoed in Started")
    parser.add_argument(
        "--image",
        action="append",
        default=[],
        type=Path,
        help="image file (repeatable, at most 2 per prompt)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(
        prog="qwen-serve", description="Client of the qwen-serve gRPC API."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="stream a chat (one prompt, stdin, or interactive)")
    chat.add_argument("prompt", nargs="?", help="the user message (default: stdin)")
    chat.add_argument("-i", "--interactive", action="store_true", help="a conversation")
    chat.add_argument("--system", help="system message")
    chat.add_argument("--tools", type=Path, metavar="FILE", help="JSON list of tools")
    chat.add_argument("--tool-choice", help="auto, none, required or a tool name")
    chat.add_argument(
        "--think",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="thinking on/off (default: the model's)",
    )
    chat.add_argument("--hide-reasoning", action="store_true", help="do not print reasoning")
    gen = sub.add_parser("generate", help="stream a raw-prompt completion")
    gen.add_argument("prompt", nargs="?", help="prompt text (with image placeholders)")
    gen.add_argument("--token-ids", help="prompt as comma-separated token ids")
    for p in (chat, gen):
        _request_flags(p)
    models = sub.add_parser("models", help="describe the served model")
    models.add_argument("--model", default="")
    health = sub.add_parser("health", help="readiness and liveness (exit 0 when serving)")
    health.add_argument("--service", action="append", help='"" readiness, liveness, ...')
    for p in (chat, gen, models, health):
        _common(p)
    chat.set_defaults(func=cmd_chat)
    gen.set_defaults(func=cmd_generate)
    models.set_defaults(func=cmd_models)
    health.set_defaults(func=cmd_health)
    return parser


def client_of(args: argparse.Namespace) -> Client:
    """A client from the connection flags."""
    return Client(
        args.target,
        api_key=args.api_key,
        tls=args.tls,
        root_certificates=args.ca_cert,
        client_certificate=args.client_cert,
        client_key=args.client_key,
        server_name=args.server_name,
        timeout=args.timeout,
        retry=RetryPolicy(max_attempts=max(1, args.retries + 1)),
    )


def request_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Sampling, constraint and common keywords from the flags."""
    sampling: Sampling = {k: getattr(args, k) for k in SAMPLING_FLAGS}  # type: ignore[assignment]
    kwargs: dict[str, Any] = {**sampling, "stop": args.stop, "ignore_eos": args.ignore_eos}
    if args.json_schema is not None:
        source = Path(args.json_schema)
        text = source.read_text() if source.is_file() else args.json_schema
        try:
            kwargs["json_schema"] = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"--json-schema is neither a file nor valid JSON: {exc}") from None
    kwargs.update(regex=args.regex, choice=args.choice, json_object=args.json_object)
    kwargs.update(model=args.model, client_request_id=args.request_id)
    if args.priority:
        kwargs["priority"] = args.priority
    return {k: v for k, v in kwargs.items() if v is not None}


def run_stream(
    stream: ChatStream, args: argparse.Namespace, show_reasoning: bool = True
) -> ChatResult:
    """Print a stream; its result (Ctrl-C cancels the call)."""
    renderer = Renderer(json_lines=args.json, color=args.color, show_reasoning=show_reasoning)
    try:
        for event in stream:
            renderer.event(event)
    except KeyboardInterrupt:
        stream.cancel()
        raise
    renderer.done()
    return renderer.result


def cmd_chat(args: argparse.Namespace) -> int:
    """``chat``: one prompt (argument or stdin) or an interactive conversation."""
    base = [system(args.system)] if args.system else []
    kwargs = request_kwargs(args)
    if args.tools:
        kwargs["tools"] = tools_from_file(args.tools)
    if args.tool_choice:
        kwargs["tool_choice"] = args.tool_choice
    if args.think is not None:
        kwargs["think"] = args.think
    images = [image(path) for path in args.image]
    interactive = args.interactive or (args.prompt is None and sys.stdin.isatty())
    with client_of(args) as client:
        if not interactive:
            prompt = args.prompt if args.prompt is not None else sys.stdin.read().strip()
            if not prompt:
                raise ValueError("empty prompt")
            stream = client.chat([*base, user(prompt, *images)], **kwargs)
            result = run_stream(stream, args, not args.hide_reasoning)
            return 1 if result.error else 0
        return _interactive(client, base, images, kwargs, args)


def _interactive(
    client: Client, base: list[Any], images: list[Any], kwargs: dict[str, Any], args: Any
) -> int:
    """Read turns from stdin until EOF or /exit; /reset starts over."""
    history = list(base)
    pending_images = list(images)
    print("qwen-serve chat: /reset starts over, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            history, pending_images = list(base), list(images)
            continue
        if not line.strip():
            continue
        turn = user(line.rstrip("\n"), *pending_images)
        result = _turn(client, [*history, turn], kwargs, args)
        if result is not None:
            history += [turn, result.message()]
            pending_images = []


def _turn(
    client: Client, messages: list[Any], kwargs: dict[str, Any], args: Any
) -> ChatResult | None:
    """One interactive turn; its result, or None when there is no answer to keep."""
    try:
        result = run_stream(client.chat(messages, **kwargs), args, not args.hide_reasoning)
    except errors.QwenServeError as exc:  # report it and stay in the conversation
        print(f"error: {exc.code.name}: {exc.message}", file=sys.stderr)
        return None
    if result.error:
        return None
    if not (result.content or result.tool_calls):
        print("(no content to keep, e.g. cut off while reasoning)", file=sys.stderr)
        return None
    return result


def cmd_generate(args: argparse.Namespace) -> int:
    """``generate``: a raw prompt (text or token ids)."""
    prompt: str | list[int]
    if args.token_ids:
        prompt = [int(t) for t in args.token_ids.replace(",", " ").split()]
    elif args.prompt is not None:
        prompt = args.prompt
    else:
        prompt = sys.stdin.read()
    kwargs = request_kwargs(args)
    kwargs["images"] = list(args.image)
    with client_of(args) as client:
        result = run_stream(client.generate(prompt, **kwargs), args)
    return 1 if result.error else 0


def cmd_models(args: argparse.Namespace) -> int:
    """``models``: the served model's name, limits and capabilities."""
    with client_of(args) as client:
        info = client.model_info(args.model)
    fields = json_format.MessageToDict(
        info, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    if args.json:
        print(json.dumps(fields, indent=2))
    else:
        width = max(len(k) for k in fields)
        for key, value in fields.items():
            print(f"{key:<{width}}  {value}")
    return 0


def cmd_health(args: argparse.Namespace) -> int:
    """``health``: readiness ("") and liveness; exit 0 only when all are SERVING."""
    services = args.service or ["", "liveness"]
    with client_of(args) as client:
        statuses = {s: client.health(s) for s in services}
    if args.json:
        print(json.dumps({s or "readiness": v for s, v in statuses.items()}))
    else:
        for service, status in statuses.items():
            print(f"{service or 'readiness'}: {status}")
    return 0 if all(v == "SERVING" for v in statuses.values()) else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except errors.QwenServeError as exc:
        code = EXIT_CODES.get(type(exc), 1)
        print(f"error: {exc.code.name}: {exc.message}", file=sys.stderr)
        return code
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ncancelled", file=sys.stderr)
        return 130
