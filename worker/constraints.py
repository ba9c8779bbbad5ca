"""Structured-output constraints -> vLLM ``StructuredOutputsParams``, and the field they name.

The router has checked each constraint (``router/validation.py``: not empty, a
well-formed and satisfiable JSON Schema, a compilable and satisfiable regex,
non-empty choices); here the JSON Schema is parsed for vLLM, and the field that a
failure of the engine's grammar is reported on is chosen.
"""

from __future__ import annotations

from qwen_serve import jsontext
from qwen_serve import request_rules as rules
from qwen_serve.api.v1 import serve_pb2 as pb
from worker.vllm_boundary import StructuredOutputsParams


def constraint_field(req: pb.ChatRequest | pb.GenerateRequest) -> str | None:
    """The API field whose constraint the engine's grammar enforces, if any.

    ``structured_output``; else, for a chat whose tool choice forces a call, the
    tools whose parameter schemas vLLM turns into the grammar.
    """
    field = rules.structured_field(req.structured_output)
    if field is not None or isinstance(req, pb.GenerateRequest) or not req.tools:
        return field
    choice = req.tool_choice
    if choice.mode == pb.ToolChoice.MODE_REQUIRED:
        return "tools"
    if choice.mode == pb.ToolChoice.MODE_FUNCTION:
        names = [tool.name for tool in req.tools]
        if choice.function_name in names:
            index = names.index(choice.function_name)
            return rules.tool_field(index, "parameters_json_schema")
    return None


def structured_outputs(so: pb.StructuredOutput) -> StructuredOutputsParams | None:
    """The constraint as vLLM ``StructuredOutputsParams``; None when unconstrained."""
    kind = so.WhichOneof("kind")
    if kind == "json_schema":
        schema = jsontext.load_object(so.json_schema, f"{rules.STRUCTURED}.json_schema")
        return StructuredOutputsParams(json=schema)
    if kind == "regex":
        return StructuredOutputsParams(regex=so.regex)
    if kind == "choice":
        return StructuredOutputsParams(choice=list(so.choice.values))
    if kind == "json_object" and so.json_object:
        return StructuredOutputsParams(json_object=True)
    return None
