"""The one check that token ids name tokens of a model's vocabulary.

Ids come from callers (a prompt sent as ids, ``logit_bias``, ``allowed_token_ids``,
``/detokenize``) and an id past the vocabulary fails deep inside an engine or a
decoder. The router checks them before any stage is asked, and each engine checks a
prompt again before the engine sees it (the engines' gRPC API is reachable by more than
the router). One function, so every stage words the refusal the same way.
"""

from __future__ import annotations

from collections.abc import Iterable

from services.errors import InvalidRequest


def check_token_ids(ids: Iterable[int], vocab_size: int, field: str = "") -> None:
    """InvalidRequest naming the first id outside ``[0, vocab_size)``, its position and
    the request ``field`` that carried it (OpenAI's ``error.param``), when one is given."""
    for position, token_id in enumerate(ids):
        if not 0 <= token_id < vocab_size:
            where = f" of {field}" if field else ""
            raise InvalidRequest(
                f"token id {token_id} at position {position}{where} is outside the "
                f"vocabulary (size {vocab_size})",
                field or None,
            )
