"""JSON Schema → GBNF grammars for llama.cpp's constrained sampling: structured output
and tool calls.

llama-cpp-python's converter (``llama_cpp.llama_grammar.SchemaConverter``) turns a schema
into a grammar that admits only instances of it, for the keywords it implements. A
keyword it does not implement would silently not be enforced, and a tool call's
arguments must be valid against the function's schema *every time*. So a schema is first
checked (:func:`check_enforceable`): every keyword either constrains the grammar,
or is an annotation (``description``, ``title``, ``format`` …, which JSON Schema does
not make validators enforce); anything else is refused with INVALID_ARGUMENT naming the
parameter and the keyword, rather than answered with output that may not validate.
What this module adds to the converter:

* integer ``minimum``/``maximum``/``exclusiveMinimum``/``exclusiveMaximum`` as exact
  digit-range rules (:func:`integer_range`);
* JSON strings that are valid JSON (the converter's ``char`` lets raw control
  characters through);
* the tool-call grammar: ``<tool_call>[{"name": …, "arguments": …}]</tool_call>``, each
  call's arguments under its function's schema (``$defs`` of every function hoisted to
  the root, as vLLM does);
* an end to runaway calls: a small model under a grammar can repeat an array's item or a
  string's words until its tokens run out, and a call cut short is not valid JSON. In a
  call, an array the schema leaves unbounded holds at most :data:`MAX_CALL_ITEMS`
  items and a plain string at most :data:`MAX_CALL_STRING` characters: still instances
  of the schema, and every call ends within a bounded number of tokens (a call cut by
  the caller's own ``max_tokens`` ends with ``finish_reason: "length"``, as OpenAI's).

``llama_cpp`` is imported only when a grammar is built.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Sequence
from typing import Any, Final

from federation.errors import ErrorCode, FederationError
from federation.inference.tools import TOOL_CLOSE, TOOL_OPEN, parameters_schema
from federation.inference.types import Tool

# llama-cpp-python's JSON-schema converter (0.3.x) lets a string hold any character but
# '"' and '\\', raw control characters included: a model may then "end" a string with a
# bare newline or tab, which no JSON parser accepts. llama.cpp's own converter (and
# llama-cpp-python's JSON_GBNF for json_object) exclude them, as JSON requires.
_LOOSE_CHAR_RULE: Final = r'char ::= [^"\\] |'
_JSON_CHAR_RULE: Final = r'char ::= [^"\\\x7F\x00-\x1F] |'

ANNOTATIONS: Final = frozenset({
    "title", "description", "default", "examples", "example", "$comment", "$schema", "$id",
    "deprecated", "readOnly", "writeOnly", "format", "nullable", "strict", "discriminator",
    "contentMediaType", "contentEncoding",
})
"""Keywords that do not constrain instances (``format`` is an annotation unless a
validator is told otherwise; the converter still enforces date, time, date-time, uuid)."""

_BOUNDS: Final = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_SUBSCHEMA_MAPS: Final = ("properties", "$defs", "definitions")
_SUBSCHEMA_LISTS: Final = ("anyOf", "oneOf", "allOf", "prefixItems")
_ENFORCED: Final = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems",
    "minItems", "maxItems", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs",
    "definitions", "minLength", "maxLength", "pattern", *_BOUNDS,
})
_UNSAFE_PATTERN: Final = re.compile(r'\.|\[\^|\\[SWDnrtfvux0]|"|\\\\|[\x00-\x1f]')
"""Pattern pieces the converter would turn into characters a JSON string must escape
(any character, negated classes, control characters, quotes, backslashes)."""
MAX_CALL_ITEMS: Final = 16
"""Most items of an array whose schema sets no ``maxItems``, in a tool call."""
MAX_CALL_STRING: Final = 256
"""Most characters of a string whose schema bounds it in no way, in a tool call."""
_PLAIN_STRING_RULE: Final = r'string ::= "\"" char* "\"" space'
_MAX_DIGITS: Final = 16
"""The converter's integers have at most 16 digits; ranges keep to that."""


def _unusable(param: str, why: str) -> FederationError:
    return FederationError(ErrorCode.INVALID_ARGUMENT,
                           f"{param}: {why}; this model's constrained decoding cannot "
                           "guarantee output valid against it", param=param)


# ---- which schemas can be enforced -----------------------------------------------------------

def check_enforceable(schema: Any, param: str) -> None:
    """Refuse (INVALID_ARGUMENT, ``param``) a schema the grammar would not enforce."""
    for pointer, node in _subschemas(schema, "#"):
        if not isinstance(node, dict):
            if isinstance(node, bool):
                continue  # true/false schemas: the converter treats them as any/none
            raise _unusable(param, f"{pointer} is not a schema")
        unknown = sorted(set(node) - _ENFORCED - ANNOTATIONS)
        if unknown:
            raise _unusable(param, f"the keyword {unknown[0]!r} at {pointer} is not supported")
        _check_node(node, pointer, param)


def _check_node(node: dict[str, Any], pointer: str, param: str) -> None:
    kind = node.get("type")
    if any(b in node for b in _BOUNDS) and kind != "integer":
        raise _unusable(param, f"bounds at {pointer} are only supported for integers")
    if ("minLength" in node or "maxLength" in node) and (kind != "string" or "pattern" in node):
        raise _unusable(param, f"minLength/maxLength at {pointer} need type string, without "
                               "a pattern")
    pattern = node.get("pattern")
    if pattern is not None:
        if not (isinstance(pattern, str) and pattern.startswith("^") and pattern.endswith("$")):
            raise _unusable(param, f"the pattern at {pointer} must be anchored (^…$)")
        if _UNSAFE_PATTERN.search(pattern[1:-1]):
            raise _unusable(param, f"the pattern at {pointer} may match characters a JSON "
                                   "string must escape")
    ref = node.get("$ref")
    if ref is not None and not (isinstance(ref, str) and ref.startswith(("#/$defs/",
                                                                         "#/definitions/"))):
        raise _unusable(param, f"the $ref at {pointer} must point into $defs")
    properties = node.get("properties") or {}
    missing = [name for name in node.get("required") or () if name not in properties]
    if missing:
        raise _unusable(param, f"{pointer} requires {missing[0]!r}, which it does not describe")
    for i, part in enumerate(node.get("allOf") or ()):
        if not isinstance(part, dict) or set(part) - {"$ref", "properties", "required",
                                                      *ANNOTATIONS}:
            raise _unusable(param, f"allOf at {pointer}/allOf/{i} may only combine objects")


def _subschemas(schema: Any, pointer: str) -> Iterator[tuple[str, Any]]:
    yield pointer, schema
    if not isinstance(schema, dict):
        return
    for key in _SUBSCHEMA_MAPS:
        for name, sub in (schema.get(key) or {}).items():
            yield from _subschemas(sub, f"{pointer}/{key}/{name}")
    for key in _SUBSCHEMA_LISTS:
        for i, sub in enumerate(schema.get(key) or ()):
            yield from _subschemas(sub, f"{pointer}/{key}/{i}")
    for key in ("items", "additionalProperties"):
        sub = schema.get(key)
        if isinstance(sub, dict):
            yield from _subschemas(sub, f"{pointer}/{key}")
        elif isinstance(sub, list):  # draft-4 tuples
            for i, item in enumerate(sub):
                yield from _subschemas(item, f"{pointer}/{key}/{i}")


# ---- integer ranges ------------------------------------------------------------------------

def integer_bounds(node: dict[str, Any]) -> tuple[int | None, int | None]:
    """The inclusive integer range a schema allows (``None``: unbounded)."""
    low = high = None
    if "minimum" in node:
        low = math.ceil(node["minimum"])
    if "exclusiveMinimum" in node:
        value = node["exclusiveMinimum"]
        if value is True and low is not None:  # draft 4: a flag on minimum
            low += 1
        elif not isinstance(value, bool):
            low = max(low if low is not None else -math.inf, math.floor(value) + 1)
    if "maximum" in node:
        high = math.floor(node["maximum"])
    if "exclusiveMaximum" in node:
        value = node["exclusiveMaximum"]
        if value is True and high is not None:
            high -= 1
        elif not isinstance(value, bool):
            high = min(high if high is not None else math.inf, math.ceil(value) - 1)
    return (None if low is None else int(low)), (None if high is None else int(high))


def integer_range(low: int | None, high: int | None) -> str:
    """A GBNF expression matching exactly the decimal integers in [low, high], as JSON
    writes them (no leading zeros, ``-`` for negatives, at most 16 digits)."""
    limit = 10**_MAX_DIGITS - 1
    low = -limit if low is None else max(low, -limit)
    high = limit if high is None else min(high, limit)
    if low > high:
        raise ValueError("empty integer range")
    parts: list[str] = []
    if low < 0:
        magnitudes = _natural_range(max(1, -high), -low)
        parts += [f'"-" {alt}' for alt in magnitudes]
    if low <= 0 <= high:
        parts.append('"0"')
    if high > 0:
        parts += _natural_range(max(1, low), high)
    return "(" + " | ".join(parts) + ")"


def _natural_range(low: int, high: int) -> list[str]:
    """Alternatives for [low, high], 1 <= low <= high, without leading zeros."""
    out: list[str] = []
    for digits in range(len(str(low)), len(str(high)) + 1):
        start = max(low, 10 ** (digits - 1))
        end = min(high, 10**digits - 1)
        out += _same_length(str(start), str(end))
    return out


def _same_length(low: str, high: str) -> list[str]:
    """Alternatives for the numbers between two equally long digit strings."""
    if not low:
        return [""]
    if low == high:
        return [f'"{low}"']
    if low[0] == high[0]:
        return [f'"{low[0]}" {rest}'.strip() for rest in _same_length(low[1:], high[1:])]
    tail = len(low) - 1
    if low[1:] == "0" * tail and high[1:] == "9" * tail:
        return [f"[{low[0]}-{high[0]}]" + " [0-9]" * tail]
    out = [f'"{low[0]}" {rest}'.strip() for rest in _same_length(low[1:], "9" * tail)]
    if int(high[0]) - int(low[0]) > 1:
        out.append(f"[{int(low[0]) + 1}-{int(high[0]) - 1}]" + " [0-9]" * tail)
    out += [f'"{high[0]}" {rest}'.strip() for rest in _same_length("0" * tail, high[1:])]
    return out


# ---- the converter ----------------------------------------------------------------------------

def _converter() -> Any:
    from llama_cpp.llama_grammar import RESERVED_NAMES, SchemaConverter

    class Converter(SchemaConverter):  # type: ignore[misc]
        """The converter, with integer ranges."""

        def visit(self, schema: Any, name: str) -> Any:
            if isinstance(schema, dict) and schema.get("type") == "integer" and any(
                    b in schema for b in _BOUNDS):
                low, high = integer_bounds(schema)
                rule = name + "-" if name in RESERVED_NAMES else name or "root"
                return self._add_rule(rule, integer_range(low, high) + " space")  # type: ignore[no-untyped-call]
            return super().visit(schema, name)  # type: ignore[no-untyped-call]

    return Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)  # type: ignore[no-untyped-call]


def _tightened(grammar: str) -> str:
    return "\n".join(
        _JSON_CHAR_RULE + line[len(_LOOSE_CHAR_RULE):] if line.startswith(_LOOSE_CHAR_RULE)
        else line for line in grammar.splitlines())


def _convert(schema: dict[str, Any], root_name: str) -> str:
    converter = _converter()
    resolved = converter.resolve_refs(schema, "input")
    converter.visit(resolved, root_name)
    return _tightened(converter.format_grammar())


def json_schema_grammar(schema: str, param: str = "response_format", *,
                        strict: bool = False) -> str:
    """The GBNF grammar of a JSON Schema (JSON text), as llama.cpp takes it: every output
    it admits is valid JSON. Without ``strict`` a response format is best effort, as
    OpenAI's: keywords the converter does not implement are not enforced (the council's
    vote schema bounds a number, which its parser clamps). With ``strict``, as tool
    arguments, it is held to :func:`check_enforceable`. Refuses (INVALID_ARGUMENT,
    ``param``) a schema that cannot be converted."""
    document = json.loads(schema)
    if strict:
        check_enforceable(document, f"{param}.json_schema.schema")
    try:
        return _convert(document, "")
    except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise _unusable(param, f"it cannot be turned into a grammar ({exc})"[:300]) from None


# ---- tool calls -------------------------------------------------------------------------------

def tool_calls_grammar(tools: Sequence[Tool], *, function: str = "", parallel: bool = True,
                       opened: bool = False) -> str:
    """The grammar of a tool-calling answer: ``<tool_call>`` (unless already ``opened``)
    and a JSON array of calls (one, with ``function`` or without ``parallel``), each
    ``{"name", "arguments"}`` with the arguments under that function's schema, then
    ``</tool_call>``.

    Free text is not part of it: holding every token of an answer to a grammar that
    admits any text costs llama.cpp a check of the whole vocabulary per token (8x slower
    on SmolLM2). When the model may choose, it generates freely until its text can no
    longer become ``<tool_call>``, or has, and only a call is generated under this
    grammar (``opened``)."""
    chosen = [(i, t) for i, t in enumerate(tools) if not function or t.name == function]
    defs: dict[str, Any] = {}
    alternatives = []
    for i, tool in chosen:
        param = f"tools[{i}].function.parameters"
        schema = parameters_schema(tool)
        check_enforceable(schema, param)
        schema = _bounded(_hoist_defs(schema, defs, param))
        alternatives.append({
            "type": "object", "additionalProperties": False,
            "properties": {"name": {"const": tool.name}, "arguments": schema},
            "required": ["name", "arguments"]})
    calls: dict[str, Any] = {"type": "array", "minItems": 1,
                             "maxItems": 1 if function or not parallel else MAX_CALL_ITEMS,
                             "items": {"anyOf": alternatives}}
    if defs:
        calls["$defs"] = {name: _bounded(sub) for name, sub in defs.items()}
    calls = json.loads(json.dumps(calls).replace('"#/definitions/', '"#/$defs/'))
    try:
        rules = _convert(calls, "tool-calls")
    except (AssertionError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise _unusable("tools", f"a function's parameters cannot be turned into a grammar "
                                 f"({exc})"[:300]) from None
    rules = rules.replace(_PLAIN_STRING_RULE,
                          f'string ::= "\\"" char{{0,{MAX_CALL_STRING}}} "\\"" space')
    start = "" if opened else f'"{TOOL_OPEN}" '
    return f'root ::= {start}space tool-calls "{TOOL_CLOSE}"\n{rules}'


def _bounded(schema: Any) -> Any:
    """The schema with :data:`MAX_CALL_ITEMS` on every array that sets no ``maxItems``."""
    if isinstance(schema, list):
        return [_bounded(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: value if key in ("enum", "const", "default", "examples") else _bounded(value)
           for key, value in schema.items()}
    if (out.get("type") == "array" or "items" in out) and "maxItems" not in out:
        out["maxItems"] = max(MAX_CALL_ITEMS, out.get("minItems", 0))
    return out


def _hoist_defs(schema: dict[str, Any], defs: dict[str, Any], param: str) -> dict[str, Any]:
    """Move the schema's ``$defs``/``definitions`` to the shared root (its ``$ref``s keep
    pointing at them); the same name with two different schemas is refused."""
    schema = dict(schema)
    for key in ("$defs", "definitions"):
        for name, sub in (schema.pop(key, None) or {}).items():
            if name in defs and defs[name] != sub:
                raise FederationError(
                    ErrorCode.INVALID_ARGUMENT,
                    f"{param}: the definition {name!r} differs from another function's; "
                    "rename one", param=param)
            defs[name] = sub
    return schema
