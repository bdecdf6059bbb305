"""One served model's tokenizer: encoding, chat templates, decoding, and its facts.

Built on transformers' tokenizer classes (which need no torch for tokenizers): they
carry the chat template and special-token settings exactly as the model ships them.
Decoding goes straight to the Rust ``tokenizers`` backend (:class:`TokenDecoder`),
which is also what the stage exports to the router for streaming.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.detokenizer import TokenDecoder
from services.errors import InvalidRequest
from services.model import ModelSpec
from services.pb import tokenizer_pb2

log = logging.getLogger(__name__)

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
#: Roles chat templates do not know, as the role they stand for: OpenAI renamed system
#: messages "developer" for its newer models, and templates predate the name.
_ROLE_ALIASES = {"developer": "system"}
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")
#: For a template that does not render tools: how they are offered to the model, in the
#: Hermes form (the form Qwen's and NousResearch's templates write), which the router's
#: default tool-call parser reads back.
_TOOLS_PROMPT = (
    "You may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n"
    "<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, '
    '"arguments": <args-json-object>}}\n</tool_call>'
)


class ModelTokenizer:
    """The tokenizer of one model, with input validation that names the problem."""

    def __init__(self, spec: ModelSpec) -> None:
        from transformers import AutoTokenizer

        self.name = spec.name
        self._hf = AutoTokenizer.from_pretrained(spec.path)
        self.decoder = TokenDecoder(self._hf.backend_tokenizer)
        # What GetDecoder streams, serialized once here (off the event loop, ~0.1 s for
        # a 50k vocabulary) rather than on every call.
        self.decoder_json = self.decoder.to_json().encode()
        self.vocab_size = len(self._hf)
        # Vocabulary entries are in the tokenizer's own alphabet (byte-level BPE spells
        # each byte as one character), so an entry is never shorter than the text its
        # token decodes to: the longest entry bounds the characters per token.
        self.max_token_chars = max(
            len(entry)
            for entry in self._hf.convert_ids_to_tokens(list(range(self.vocab_size)))
            if entry
        )
        config = _read_json(spec.path / "config.json")
        generation = _read_json(spec.path / "generation_config.json")
        self.max_model_len = next(
            (int(config[key]) for key in _CONTEXT_KEYS if isinstance(config.get(key), int)),
            min(int(self._hf.model_max_length), 1 << 31),
        )
        eos: set[int] = set()
        for source in (
            generation.get("eos_token_id"),
            config.get("eos_token_id"),
            self._hf.eos_token_id,
        ):
            if isinstance(source, int):
                eos.add(source)
            elif isinstance(source, list):
                eos.update(int(i) for i in source)
        self.eos_token_ids = sorted(eos)
        template = str(getattr(self._hf, "chat_template", None) or "")
        self.has_chat_template = bool(template)
        #: Whether the template itself renders the tools, and an assistant's tool calls.
        self._renders_tools = "tools" in template.replace("tool_calls", "")
        self._renders_tool_calls = "tool_calls" in template

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=add_special_tokens))

    def render_chat(self, chat: tokenizer_pb2.ChatInput) -> str:
        """The prompt text the model's chat template makes of ``chat``."""
        if not self.has_chat_template:
            raise InvalidRequest(f"model {self.name!r} has no chat template; send plain text")
        if not chat.messages:
            raise InvalidRequest("chat input needs at least one message")
        tools = _tools(chat.tools_json)
        messages: list[dict[str, Any]] = []
        for position, message in enumerate(chat.messages):
            if message.role not in CHAT_ROLES:
                raise InvalidRequest(
                    f"message {position} has invalid role {message.role!r}; "
                    f"expected one of {', '.join(sorted(CHAT_ROLES))}"
                )
            messages.append(self._message(message))
        if tools and not self._renders_tools:
            offer = _TOOLS_PROMPT.format(tools="\n".join(json.dumps(tool) for tool in tools))
            if messages[0]["role"] == "system":
                messages[0]["content"] = f"{messages[0]['content']}\n\n{offer}"
            else:
                messages.insert(0, {"role": "system", "content": offer})
        add_generation_prompt = (
            chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
        )
        if chat.continue_final_message:
            if messages[-1]["role"] != "assistant":
                raise InvalidRequest("continue_final_message needs a final assistant message")
            add_generation_prompt = False
        from jinja2 import TemplateError

        try:
            return str(
                self._hf.apply_chat_template(
                    messages,
                    tokenize=False,
                    add_generation_prompt=add_generation_prompt,
                    continue_final_message=chat.continue_final_message,
                    tools=tools or None,
                )
            )
        except TemplateError as exc:  # the template itself rejects the conversation
            raise InvalidRequest(f"chat template rejected the messages: {exc}") from None

    def _message(self, message: tokenizer_pb2.ChatMessage) -> dict[str, Any]:
        """A message as templates take it; tool calls the template would drop are written
        into the content in the Hermes form, so the model still sees what it called."""
        entry: dict[str, Any] = {
            "role": _ROLE_ALIASES.get(message.role, message.role),
            "content": message.content,
        }
        if message.name:
            entry["name"] = message.name
        if message.tool_call_id:
            entry["tool_call_id"] = message.tool_call_id
        if message.tool_calls:
            calls = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": _arguments(call)},
                }
                for call in message.tool_calls
            ]
            if self._renders_tool_calls:
                entry["tool_calls"] = calls
            else:
                written = "\n".join(
                    f'<tool_call>\n{{"name": {json.dumps(c["function"]["name"])}, '
                    f'"arguments": {json.dumps(c["function"]["arguments"])}}}\n</tool_call>'
                    for c in calls
                )
                entry["content"] = f"{message.content}\n{written}" if message.content else written
        return entry

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        return [str(token) for token in self._hf.convert_ids_to_tokens(list(ids))]

    def info(self, served: Sequence[str]) -> tokenizer_pb2.ModelInfo:
        info = tokenizer_pb2.ModelInfo(
            model=self.name,
            vocab_size=self.vocab_size,
            eos_token_ids=self.eos_token_ids,
            max_model_len=self.max_model_len,
            has_chat_template=self.has_chat_template,
            special_tokens=list(self._hf.all_special_tokens),
            served_models=list(served),
            max_token_chars=self.max_token_chars,
        )
        if self._hf.bos_token_id is not None:
            info.bos_token_id = int(self._hf.bos_token_id)
        if self._hf.pad_token_id is not None:
            info.pad_token_id = int(self._hf.pad_token_id)
        return info


def _tools(tools_json: str) -> list[dict[str, Any]]:
    """The request's tools (OpenAI's array), checked enough for a template to render."""
    if not tools_json:
        return []
    try:
        tools = json.loads(tools_json)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"tools is not valid JSON: {exc}", "tools") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise InvalidRequest("tools must be an array of objects", "tools")
    return tools


def _arguments(call: tokenizer_pb2.ToolCall) -> Any:
    """A call's arguments as a value (templates write them with tojson); text that is not
    JSON stays text."""
    try:
        return json.loads(call.arguments or "{}")
    except json.JSONDecodeError:
        return call.arguments


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data if isinstance(data, dict) else {}
