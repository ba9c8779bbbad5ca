"""Python client of qwen-serve: async and sync clients, typed events, helpers and a CLI.

::

    from qwen_serve_client import Client, Delta, user, image, tool_from_function

    with Client("127.0.0.1:50051") as client:
        stream = client.chat([user("What is in this picture?", image("cat.png"))], max_tokens=200)
        for event in stream:
            if isinstance(event, Delta):
                print(event.content, end="", flush=True)
        print(stream.result.usage)

``python -m qwen_serve_client --help`` (or ``qwen-serve``) is the command line.
See docs/api.md for the API and every event.
"""

from qwen_serve_client.aio import AsyncChatStream, AsyncClient
from qwen_serve_client.connection import Connection, ConnectionOptions, RetryPolicy
from qwen_serve_client.content import (
    assistant,
    image,
    image_from_bytes,
    image_from_path,
    image_from_pil,
    image_from_url,
    system,
    tool_result,
    user,
)
from qwen_serve_client.errors import (
    AuthError,
    Cancelled,
    ConnectError,
    DeadlineExceeded,
    InvalidRequest,
    NotFound,
    Overloaded,
    QwenServeError,
    RpcFailed,
    StreamFailed,
)
from qwen_serve_client.events import (
    Delta,
    Event,
    Finished,
    FinishReason,
    Started,
    StreamError,
    TokenLogprob,
    ToolCall,
    ToolCallFragment,
    Usage,
)
from qwen_serve_client.requests import ChatArgs, GenerateArgs, chat_request, generate_request
from qwen_serve_client.result import Accumulator, ChatResult, Choice, accumulate, accumulate_async
from qwen_serve_client.sync import ChatStream, Client
from qwen_serve_client.tools import tool, tool_choice, tool_from_function, tools_from_file

__all__ = [
    "Accumulator",
    "AsyncChatStream",
    "AsyncClient",
    "AuthError",
    "Cancelled",
    "ChatArgs",
    "ChatResult",
    "ChatStream",
    "Choice",
    "Client",
    "ConnectError",
    "Connection",
    "ConnectionOptions",
    "DeadlineExceeded",
    "Delta",
    "Event",
    "FinishReason",
    "Finished",
    "GenerateArgs",
    "InvalidRequest",
    "NotFound",
    "Overloaded",
    "QwenServeError",
    "RetryPolicy",
    "RpcFailed",
    "Started",
    "StreamError",
    "StreamFailed",
    "TokenLogprob",
    "ToolCall",
    "ToolCallFragment",
    "Usage",
    "accumulate",
    "accumulate_async",
    "assistant",
    "chat_request",
    "generate_request",
    "image",
    "image_from_bytes",
    "image_from_path",
    "image_from_pil",
    "image_from_url",
    "system",
    "tool",
    "tool_choice",
    "tool_from_function",
    "tool_result",
    "tools_from_file",
    "user",
]
