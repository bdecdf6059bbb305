"""Token ids to text: a model's decoder, and streaming detokenization with stop strings.

:class:`TokenDecoder` wraps the model's fast tokenizer (the Rust ``tokenizers``
library, no transformers, no torch). The tokenizer stage builds it from the model's
files and exports it as JSON (``GetDecoder``); the router rebuilds it from that export
and detokenizes the engines' ids itself, so text costs no gRPC round trip per token
(docs/design.md, "Where detokenization runs").

Streaming detokenization: token ids in, text that is final out.

Two things make streaming text harder than decoding once at the end:

- A character can span several tokens (byte-level BPE splits an emoji or a CJK
  character into byte tokens). Decoding a prefix then ends in U+FFFD; that text is
  held back until a later token completes the character.
- A stop string can span tokens. Text that could be the start of a stop string is
  held back until it is known not to be one, so a client never sees part of a stop
  string that then disappears.

Decoding is the ``tokenizers`` library's own ``DecodeStream`` (:class:`IdStream`): the
window algorithm of vLLM's prefix/read offsets (each step decodes the ids since the last
emitted boundary with the previous ones as context, so a step costs O(window), not
O(sequence), and a leading space renders as it would mid-text), done in Rust. It
replaced a Python version of the same window that decoded twice per step: about 44 µs
per token against 1 µs on the bundled model's tokenizer, which the router pays for every
token it relays (issue #28). The concatenated output equals decoding the whole sequence
at once.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream


class TokenDecoder:
    """Decodes one model's token ids, exactly as the tokenizer stage does.

    Built from the fast tokenizer itself, or from its JSON serialization (what the
    tokenizer stage's ``GetDecoder`` streams): both decode identically, so text is the
    same whichever stage turned the ids into it.
    """

    def __init__(self, backend: Tokenizer) -> None:
        self._backend = backend

    @classmethod
    def from_json(cls, serialized: str) -> TokenDecoder:
        """Rebuild from :meth:`to_json`'s output (a big vocabulary takes a few hundred ms)."""
        return cls(Tokenizer.from_str(serialized))

    def to_json(self) -> str:
        return str(self._backend.to_str())

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def token_texts(self, ids: Sequence[int]) -> list[str]:
        """Each id decoded on its own, special tokens kept (a split character shows as U+FFFD)."""
        return [self.decode([token_id], skip_special_tokens=False) for token_id in ids]

    def detokenizer(
        self,
        context_ids: Sequence[int] = (),
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> IncrementalDetokenizer:
        """A streaming detokenizer for one generated sequence (see
        :class:`IncrementalDetokenizer`)."""
        return IncrementalDetokenizer(
            IdStream(self._backend, context_ids, skip_special_tokens),
            stop=stop,
            include_stop_str_in_output=include_stop_str_in_output,
        )


class IdStream:
    """One sequence's ids in, the text they complete out (``tokenizers``' DecodeStream).

    ``context_ids`` (the end of the prompt) shape how the first ids render and are never
    emitted. Ids that end inside a character are held: :meth:`push` returns "" until a
    later id completes it, and :meth:`finish` renders what is still held, a cut
    character as U+FFFD, as decoding the whole sequence would.
    """

    def __init__(
        self, backend: Tokenizer, context_ids: Sequence[int], skip_special_tokens: bool
    ) -> None:
        self._backend = backend
        self._skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(ids=list(context_ids), skip_special_tokens=skip_special_tokens)
        #: The id before the held ones (context for :meth:`finish`), and the held ids.
        self._anchor: list[int] = list(context_ids[-1:])
        self._held: list[int] = []

    def push(self, ids: Sequence[int]) -> str:
        """The text that ``ids`` (with any held before them) complete; "" while held."""
        chunk = self._stream.step(self._backend, list(ids))
        if chunk is None:
            self._held.extend(ids)
            return ""
        self._anchor, self._held = [ids[-1]], []
        return str(chunk)

    def finish(self) -> str:
        """The text of the ids still held (none: "")."""
        if not self._held:
            return ""
        decode = functools.partial(
            self._backend.decode, skip_special_tokens=self._skip_special_tokens
        )
        before = decode(self._anchor)
        return str(decode(self._anchor + self._held))[len(before) :]


class IncrementalDetokenizer:
    """Detokenizes one generated sequence, emitting only final text, watching stop strings.

    After a stop string matched, :attr:`stopped` is set and further ids are ignored.
    """

    def __init__(
        self,
        ids: IdStream,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self._ids = ids
        self._stop = [s for s in stop if s]
        self._include_stop = include_stop_str_in_output
        self._text = ""  # all final text produced by decoding so far
        self._released = 0  # how much of _text was returned to the caller
        self.num_tokens = 0
        self.stopped = False
        self.stop_reason = ""

    def push(self, ids: Sequence[int]) -> str:
        """Add generated ids; return the text that became final (possibly empty)."""
        if self.stopped or not ids:
            return ""
        self.num_tokens += len(ids)
        self._text += self._ids.push(ids)
        return self._release(final=False)

    def finish(self) -> str:
        """No more ids: return everything still held back (a cut character as U+FFFD)."""
        if self.stopped:
            return ""
        self._text += self._ids.finish()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        start = self._released
        match = self._find_stop(start)
        if match is not None:
            index, stop = match
            end = index + len(stop) if self._include_stop else index
            self.stopped = True
            self.stop_reason = stop
        elif final:
            end = len(self._text)
        else:
            end = len(self._text) - partial_marker_length(self._text, self._stop, self._released)
        self._released = max(end, start)
        return self._text[start : self._released]

    def _find_stop(self, start: int) -> tuple[int, str] | None:
        """Earliest stop-string match at or after ``start`` (earlier text was checked before)."""
        best: tuple[int, str] | None = None
        for stop in self._stop:
            index = self._text.find(stop, start)
            if index >= 0 and (best is None or index < best[0]):
                best = (index, stop)
        return best


def partial_marker_length(text: str, markers: Iterable[str], start: int = 0) -> int:
    """Length of the longest end of ``text[start:]`` that is a proper prefix of one of
    ``markers``: text to hold back, because the next piece may complete the marker (a
    stop string here, a tool-call tag in the router's parsers)."""
    longest = 0
    for marker in markers:
        for length in range(min(len(marker) - 1, len(text) - start), longest, -1):
            if marker.startswith(text[len(text) - length :]):
                longest = length
                break
    return longest
