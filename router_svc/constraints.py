"""Output constraints checked in the router, before any engine works on the request.

The decode engine enforces a constraint with vLLM's structured outputs (xgrammar, and
llguidance for what xgrammar cannot do). An invalid one would be found there only after
the prompt was prefilled, perhaps on another engine, so the router compiles it first
with llguidance, the torch-free grammar library vLLM itself falls back to, and checks a
JSON schema against its metaschema with ``jsonschema``. A constraint both accept is one
vLLM's "auto" backend can serve.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import jsonschema
from llguidance import LLMatcher, grammar_from
from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

from services.errors import InvalidRequest
from services.pb import common_pb2

_PARAM = "structured_outputs"


def check_constraint(constraint: common_pb2.StructuredOutputs, max_chars: int) -> None:
    """Raise :class:`InvalidRequest` unless ``constraint`` is one the engines can enforce."""
    kind = constraint.WhichOneof("constraint")
    if kind is None:
        raise InvalidRequest("structured_outputs sets no constraint", _PARAM)
    if kind == "json_object":
        if not constraint.json_object:
            raise InvalidRequest("structured_outputs.json_object must be true when set", _PARAM)
        return
    text = "".join(constraint.choice.options) if kind == "choice" else getattr(constraint, kind)
    if len(text) > max_chars:
        raise InvalidRequest(
            f"the {kind} constraint has {len(text)} characters; at most {max_chars}", _PARAM
        )
    if kind == "json_schema":
        schema = json_schema(constraint.json_schema)
        _compile("json_schema", json.dumps(schema), "JSON schema")
    elif kind == "regex":
        _compile("regex", constraint.regex, "regex")
    elif kind == "grammar":
        if not constraint.grammar.strip():
            raise InvalidRequest("the grammar is empty", _PARAM)
        try:
            lark = any_to_lark(constraint.grammar)
        except GbnfToLarkError as exc:
            raise InvalidRequest(f"invalid grammar: {exc}", _PARAM) from None
        _compile("lark", lark, "grammar")
    elif not constraint.choice.options:
        raise InvalidRequest("choice needs at least one option", _PARAM)


def json_schema(text: str) -> dict[str, Any] | bool:
    """A JSON schema parsed and checked against the metaschema it names (2020-12 when none)."""
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"the JSON schema is not valid JSON: {exc}", _PARAM) from None
    if not isinstance(schema, dict | bool):
        raise InvalidRequest("a JSON schema must be an object or a boolean", _PARAM)
    try:
        jsonschema.validators.validator_for(
            schema, default=jsonschema.Draft202012Validator
        ).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise InvalidRequest(f"invalid JSON schema: {exc.message}", _PARAM) from None
    return schema


def _compile(kind: Literal["json_schema", "regex", "lark"], text: str, what: str) -> None:
    error = LLMatcher.validate_grammar(grammar_from(kind, text))
    if error:
        raise InvalidRequest(f"invalid {what}: {error.strip()}", _PARAM)
