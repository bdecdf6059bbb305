"""Streaming detokenization and stop strings, against the model's real tokenizer.

The logic under test has no I/O; the tokenizer is the real one the stage loads.
"""

from __future__ import annotations

import pytest

from services.detokenizer import IncrementalDetokenizer, TokenDecoder
from tests.corpus import CORPUS


@pytest.fixture(scope="module")
def decoder(hf_tokenizer) -> TokenDecoder:
    return TokenDecoder(hf_tokenizer.backend_tokenizer)


@pytest.fixture(scope="module")
def decode(decoder):
    return lambda ids: decoder.decode(ids, skip_special_tokens=False)


def stream(decoder, ids, chunk=1, **kwargs) -> tuple[str, IncrementalDetokenizer]:
    detok = decoder.detokenizer(skip_special_tokens=False, **kwargs)
    out = []
    for i in range(0, len(ids), chunk):
        out.append(detok.push(ids[i : i + chunk]))
    out.append(detok.finish())
    return "".join(out), detok


@pytest.mark.parametrize("text", CORPUS)
def test_every_prefix_streams_to_the_one_shot_decoding(
    hf_tokenizer, decoder, decode, text: str
) -> None:
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    for end in range(1, len(ids) + 1):
        streamed, _ = stream(decoder, ids[:end])
        assert streamed == decode(ids[:end]), f"prefix of {end} tokens of {text!r}"


def test_multibyte_characters_are_held_until_complete(hf_tokenizer, decoder, decode) -> None:
    ids = hf_tokenizer.encode("😀", add_special_tokens=False)
    assert len(ids) > 1, "the emoji should span several byte tokens"
    detok = decoder.detokenizer(skip_special_tokens=False)
    deltas = [detok.push([token]) for token in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1)
    assert deltas[-1] == "😀"
    assert all("\ufffd" not in delta for delta in deltas)


def test_a_cut_character_is_flushed_as_replacement_char(hf_tokenizer, decoder, decode) -> None:
    ids = hf_tokenizer.encode("😀", add_special_tokens=False)[:-1]
    streamed, _ = stream(decoder, ids)
    assert streamed == decode(ids)
    assert streamed.endswith("\ufffd")


def test_context_ids_shape_decoding_but_are_not_emitted(hf_tokenizer, decoder, decode) -> None:
    prompt = hf_tokenizer.encode("Say hi:", add_special_tokens=False)
    answer = hf_tokenizer.encode("Say hi: hello world", add_special_tokens=False)[len(prompt) :]
    streamed, _ = stream(decoder, answer, context_ids=prompt)
    assert streamed == decode(prompt + answer)[len(decode(prompt)) :]


@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_stop_string_split_across_tokens_is_caught(
    hf_tokenizer, decoder, decode, chunk: int
) -> None:
    text = "The answer is forty-two. END_OF_ANSWER and more text after"
    ids = hf_tokenizer.encode(text, add_special_tokens=False)
    stop = "END_OF_ANSWER"
    pieces = [decode([i]) for i in ids]
    assert stop not in pieces, "the stop string must span several tokens for this test"
    streamed, detok = stream(decoder, ids, chunk=chunk, stop=[stop])
    assert streamed == "The answer is forty-two. "
    assert detok.stopped and detok.stop_reason == stop


def test_stop_string_kept_when_asked(hf_tokenizer, decoder, decode) -> None:
    ids = hf_tokenizer.encode("one two three four", add_special_tokens=False)
    streamed, detok = stream(decoder, ids, stop=["three"], include_stop_str_in_output=True)
    assert streamed == "one two three"
    assert detok.stopped


def test_partial_stop_string_is_never_emitted_then_released(hf_tokenizer, decoder, decode) -> None:
    # "ENDX" starts like the stop string "END!" but is not it: the held text must come
    # out once it is known not to be a stop string, and nothing is emitted twice.
    ids = hf_tokenizer.encode("abc ENDX def END! ghi", add_special_tokens=False)
    detok = decoder.detokenizer(skip_special_tokens=False, stop=["END!"])
    deltas = [detok.push([token]) for token in ids]
    released = "".join(deltas)
    assert released == "abc ENDX def "
    # At no point did the client hold text ending in the start of the stop string.
    for i in range(len(deltas)):
        assert not "".join(deltas[: i + 1]).endswith(("E", "EN", "END"))


def test_earliest_of_several_stop_strings_wins(hf_tokenizer, decoder, decode) -> None:
    ids = hf_tokenizer.encode("alpha beta gamma delta", add_special_tokens=False)
    streamed, detok = stream(decoder, ids, chunk=len(ids), stop=["delta", "beta"])
    assert streamed == "alpha "
    assert detok.stop_reason == "beta"


def test_ids_after_a_stop_are_ignored(hf_tokenizer, decoder, decode) -> None:
    ids = hf_tokenizer.encode("stop here. Then more", add_special_tokens=False)
    detok = decoder.detokenizer(skip_special_tokens=False, stop=["."])
    text = "".join(detok.push([token]) for token in ids)
    assert text == "stop here"
    assert detok.push(ids) == "" and detok.finish() == ""
