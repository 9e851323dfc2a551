"""Tool calling for backends that generate text: the request checks, how tools and calls
are written into a prompt, and the parser that turns generated text back into typed,
streamed tool calls.

A model without tool calling of its own (the embedded llama.cpp model, the test backend)
answers a call in one text format::

    <tool_call>[{"name": "get_weather", "arguments": {"location": "Paris"}}]</tool_call>

llama.cpp is held to it by a grammar (``federation.inference.grammar``): the arguments
object is generated under the function's parameter schema, so it is valid JSON and valid
against the schema by construction. :class:`ToolCallParser` reads the text as it streams
and yields OpenAI's streamed shape: a call's index, id and name first, then its arguments
in pieces as they are generated. An upstream with tool calling of its own (vLLM behind
the ``openai`` backend) streams typed calls, which are passed through as they come.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from federation.errors import ErrorCode, FederationError
from federation.inference.types import (
    ChatMessage,
    GenerationRequest,
    Tool,
    ToolCallDelta,
)

TOOL_OPEN: Final = "<tool_call>"
TOOL_CLOSE: Final = "</tool_call>"
MAX_TOOLS: Final = 128
"""OpenAI's limit of functions per request."""
_NAME: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
EMPTY_PARAMETERS: Final[dict[str, Any]] = {"type": "object", "properties": {}}
MAX_SCHEMA_DEPTH: Final = 64
"""Deepest nesting of objects and arrays in a JSON Schema a request may carry (a
function's parameters, a response format): far beyond any real schema, and well within
the recursion of the JSON parser and of the grammar converter, which a deeper document
exhausted (an INTERNAL error instead of the caller's INVALID_ARGUMENT)."""


def new_call_id() -> str:
    """An id for a generated call, in OpenAI's shape (``call_`` and 24 characters)."""
    return "call_" + secrets.token_hex(12)


def parameters_schema(tool: Tool) -> dict[str, Any]:
    """The tool's argument schema as a document (checked by :func:`check_tools`)."""
    if not tool.parameters:
        return dict(EMPTY_PARAMETERS)
    schema = json.loads(tool.parameters)
    assert isinstance(schema, dict)
    return schema


def check_tools(request: GenerationRequest) -> None:
    """What every backend relies on: names, schemas, the choice naming a real tool.
    Raises INVALID_ARGUMENT naming the parameter as the OpenAI API does."""
    tools = request.tools
    if request.prompt is not None and tools:
        raise _invalid("tools", "Tools are only supported for chat completions.")
    if len(tools) > MAX_TOOLS:
        raise _invalid("tools", f"At most {MAX_TOOLS} tools are allowed.")
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        if not _NAME.match(tool.name):
            raise _invalid(f"tools[{i}].function.name", "A function name must be 1 to 64 "
                           "characters: letters, digits, underscores and dashes.")
        if tool.name in seen:
            raise _invalid(f"tools[{i}].function.name",
                           f"The function name {tool.name!r} is used twice.")
        seen.add(tool.name)
        if tool.parameters:
            schema_object(tool.parameters, f"tools[{i}].function.parameters",
                          "The function's parameters")
    choice = request.tool_choice
    if choice.forces_call and not tools:
        raise _invalid("tool_choice", "tool_choice requires tools.")
    if choice.mode == "function" and choice.function not in seen:
        raise _invalid("tool_choice", f"tool_choice names the function {choice.function!r}, "
                       "which is not among the tools.")


def schema_object(text: str, param: str, what: str) -> dict[str, Any]:
    """The JSON Schema object ``text`` holds; INVALID_ARGUMENT naming ``param`` when it
    is not JSON, not an object, or nested deeper than :data:`MAX_SCHEMA_DEPTH`."""
    try:
        schema = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested past the parser's limit
        schema = None
    if not isinstance(schema, dict):
        raise _invalid(param, f"{what} must be a JSON Schema object.")
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise _invalid(param, f"{what} must not be nested deeper than {MAX_SCHEMA_DEPTH} "
                              "levels.")
    return schema


def _depth(document: dict[str, Any]) -> int:
    """How deep objects and arrays nest in ``document`` (itself 1); iterative, so that
    measuring a deep document cannot exhaust the recursion it is measured to protect."""
    deepest = 0
    pending: list[tuple[Any, int]] = [(document, 1)]
    while pending:
        node, depth = pending.pop()
        deepest = max(deepest, depth)
        children = node.values() if isinstance(node, dict) else node
        pending.extend((child, depth + 1) for child in children
                       if isinstance(child, dict | list))
    return deepest


def _invalid(param: str, message: str) -> FederationError:
    return FederationError(ErrorCode.INVALID_ARGUMENT, message, param=param)


# ---- writing tools and calls into a prompt -------------------------------------------------

def tool_instructions(tools: Sequence[Tool]) -> str:
    """The system-prompt text that shows a model the functions and the call format: the
    layout SmolLM2-Instruct was trained on (its model card and Ollama's template: the
    tools in ``<tools>``, calls as a JSON list in ``<tool_call>``), in our words."""
    listed = json.dumps([{"name": t.name, "description": t.description,
                          "parameters": parameters_schema(t)} for t in tools],
                        ensure_ascii=False)
    return (
        "You are an expert in composing functions. You are given a question and a set of "
        "possible functions. Based on the question, make one or more function calls to "
        "achieve its purpose. If none of the functions can be used, answer in words.\n"
        f"You have access to the following tools:\n<tools>{listed}</tools>\n"
        "To call functions, the output must be in the following format and hold no other "
        "text:\n"
        f'{TOOL_OPEN}[\n{{"name": "func_name1", "arguments": {{"argument1": "value1"}}}}\n]'
        f"{TOOL_CLOSE}"
    )


def written_calls(message: ChatMessage) -> str:
    """An assistant message's content with its tool calls written in the call format."""
    if not message.tool_calls:
        return message.content
    calls = ", ".join(
        f'{{"name": {json.dumps(c.name)}, "arguments": {c.arguments or "{}"}}}'
        for c in message.tool_calls)
    return f"{message.content}{TOOL_OPEN}[{calls}]{TOOL_CLOSE}"


def prompt_messages(request: GenerationRequest) -> list[dict[str, str]]:
    """The conversation as a plain chat template takes it (role and content only): the
    tools, when the model may call them, described in the system message, the history's
    calls written in the call format, and a tool's result as a user message in
    ``<tool_response>`` (many templates know no ``tool`` role)."""
    messages = [{"role": "user",
                 "content": f"<tool_response>\n{m.content}\n</tool_response>"}
                if m.role == "tool" else {"role": m.role, "content": written_calls(m)}
                for m in request.messages]
    if request.calls_tools:
        instructions = tool_instructions(request.tools)
        if messages and messages[0]["role"] == "system":
            messages[0] = {"role": "system",
                           "content": messages[0]["content"] + "\n\n" + instructions}
        else:
            messages.insert(0, {"role": "system", "content": instructions})
    return messages


# ---- reading calls back ----------------------------------------------------------------------

@dataclass
class Parsed:
    """What one piece of generated text turned out to be."""

    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


class ToolCallParser:
    """Splits generated text into content and streamed tool calls.

    ``forced`` (tool choice ``required`` or a named function): the text is calls from
    its first character. Otherwise the text is held back while it may still become
    :data:`TOOL_OPEN`; once it cannot, it is content, all of it.

    The calls are ``[{"name": ..., "arguments": {...}}, ...]`` after :data:`TOOL_OPEN`
    (whitespace allowed between JSON tokens). A call's first delta carries its index,
    a fresh id and its name, as soon as the name's closing quote arrives; then each
    piece of its arguments object is passed on as it arrives.
    """

    def __init__(self, *, forced: bool) -> None:
        self._mode = "calls_open" if forced else "deciding"
        self._held = ""
        self.calls = 0
        """Calls begun so far."""
        # The JSON scanner of the calls array.
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._token = ""  # the string being read (a key or the name), raw
        self._key = ""
        self._expect_key = False
        self._name: str | None = None
        self._args_depth: int | None = None  # depth at which the arguments object opened
        self._args: list[str] = []
        self._pending: ToolCallDelta | None = None  # a call whose name is read, not yet sent

    @property
    def in_calls(self) -> bool:
        return self._mode in ("calls_open", "calls", "done")

    def feed(self, text: str) -> Parsed:
        out = Parsed()
        if self._mode == "deciding":
            self._held += text
            if self._held.startswith(TOOL_OPEN):
                text, self._held = self._held[len(TOOL_OPEN):], ""
                self._mode = "calls"
            elif TOOL_OPEN.startswith(self._held):
                return out
            else:
                out.content, self._held, self._mode = self._held, "", "text"
                return out
        if self._mode == "text":
            out.content = text
            return out
        if self._mode == "calls_open":
            self._held += text
            stripped = self._held.lstrip()
            if TOOL_OPEN.startswith(stripped):
                return out
            if not stripped.startswith(TOOL_OPEN):
                raise _malformed()
            text, self._held = stripped[len(TOOL_OPEN):], ""
            self._mode = "calls"
        for char in text:
            if self._mode == "done":
                break  # the closing tag and anything after the array
            self._scan(char, out)
        self._flush_arguments(out)
        return out

    def finish(self, *, cut: bool = False) -> Parsed:
        """The end of the text: what was held back (content that only looked like the
        start of a call). Calls left unfinished are an error, unless the generation was
        ``cut`` by its token limit (OpenAI then answers the partial call, with
        ``finish_reason: "length"``)."""
        out = Parsed()
        if self._mode == "deciding":
            out.content, self._held = self._held, ""
        elif self._mode in ("calls_open", "calls") and not cut:
            raise _malformed()
        self._flush_arguments(out)
        return out

    # -- the scanner -----------------------------------------------------------------------

    def _scan(self, char: str, out: Parsed) -> None:
        capturing = self._args_depth is not None
        if capturing:
            self._args.append(char)
        if self._in_string:
            self._scan_string(char)
            return
        if char == '"':
            self._in_string, self._token = True, ""
        elif char in "[{":
            self._depth += 1
            if self._depth == 2 and char == "{":
                self._expect_key = True
            elif self._depth == 3 and self._key == "arguments" and not capturing:
                self._args_depth, self._args = 2, [char]
        elif char in "]}":
            self._depth -= 1
            if capturing and self._depth == self._args_depth:
                self._args_depth = None
                self._flush_arguments(out)
            if self._depth == 1 and char == "}":
                self._end_call(out)
            elif self._depth == 0:
                self._mode = "done"
        elif char == "," and self._depth == 2:
            self._expect_key = True
        elif char == ":" and self._depth == 2:
            self._expect_key = False
        elif not char.isspace() and self._depth == 2 and self._key == "arguments" \
                and not capturing:
            raise _malformed()  # arguments must be an object

    def _scan_string(self, char: str) -> None:
        if self._escape:
            self._escape = False
        elif char == "\\":
            self._escape = True
        elif char == '"':
            self._in_string = False
            if self._depth == 2:
                self._string_done()
            return
        if self._depth == 2:
            self._token += char

    def _string_done(self) -> None:
        value = json.loads(f'"{self._token}"')
        if self._expect_key:
            self._key = value
        elif self._key == "name":
            self._name = value
            self._begin_call()

    def _begin_call(self) -> None:
        self._pending = ToolCallDelta(self.calls, new_call_id(), self._name or "")

    def _flush_arguments(self, out: Parsed) -> None:
        pending = self._pending
        if pending is not None:
            out.tool_calls.append(pending)
            self._pending = None
            self.calls += 1
        if self._args and self._name is not None:
            piece = "".join(self._args)
            self._args = []
            if out.tool_calls and out.tool_calls[-1].index == self.calls - 1 \
                    and not out.tool_calls[-1].arguments:
                last = out.tool_calls.pop()
                out.tool_calls.append(ToolCallDelta(last.index, last.id, last.name, piece))
            else:
                out.tool_calls.append(ToolCallDelta(self.calls - 1, arguments=piece))

    def _end_call(self, out: Parsed) -> None:
        if self._name is None:
            raise _malformed()
        self._flush_arguments(out)
        self._name, self._key, self._expect_key = None, "", False


def _malformed() -> FederationError:
    return FederationError(ErrorCode.INTERNAL, "the model's tool call could not be read")
