"""Incremental detokenization and stop strings: the text a client sees, delta by delta."""

from __future__ import annotations

import random

import pytest

from engine.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from engine.stop import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, StopMatcher, validate_stop_strings
from engine.tokenizer import Tokenizer
from tests.engine.tokenizer_folders import byte_fallback_tokenizer_dir, smollm2_tokenizer_dir

TEXTS = [
    "Hello, world! This is a plain English sentence.",
    "Emoji: 😀👍🏽 family 👨‍👩‍👧 flag 🇫🇷 and a heart ❤️ at the end 🎉",
    "日本語のテキストと中文文本，还有한국어 텍스트。",
    "Accented: naïve café, Ångström, São Paulo, Zürich, œuvre, ß.",
    "def f(x):\n    return  x  +  1\n\n\tif  x:\n        pass  # two  spaces\n",
    "  leading spaces, trailing spaces   \n\n\n",
    "Mixed € £ ¥ ₿ — “quotes” … and math ∑∫√∞ ≠ ≤",
]


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer(smollm2_tokenizer_dir(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def byte_fallback(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer(byte_fallback_tokenizer_dir(tmp_path_factory.getbasetemp()))


def _stream(tokenizer: Tokenizer, ids: list[int], prompt: list[int] | None = None) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, prompt or [])
    deltas = [detokenizer.push(i) for i in ids]
    deltas.append(detokenizer.flush())
    assert detokenizer.num_held_tokens == 0
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_decode_and_stay_valid(smol: Tokenizer, text: str) -> None:
    ids = smol.encode_text(text)
    deltas = _stream(smol, ids)
    assert "".join(deltas) == smol.decode(ids) == text
    assert not any(REPLACEMENT_CHAR in d for d in deltas)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_in_chat_prompt_context(smol: Tokenizer, text: str) -> None:
    prompt = smol.render_chat([("user", "Say something.")])
    ids = smol.encode_text(text) + sorted(smol.eos_token_ids)
    deltas = _stream(smol, ids, prompt)
    assert "".join(deltas) == text
    assert "<|im_end|>" not in "".join(deltas)


def test_multibyte_character_is_held_until_complete(smol: Tokenizer) -> None:
    ids = smol.encode_text(" 😀")
    assert len(ids) >= 2, "the emoji must span tokens for this test to mean anything"
    detokenizer = IncrementalDetokenizer(smol, [])
    assert detokenizer.push(ids[0]) == ""
    assert detokenizer.num_held_tokens == 1
    assert "".join(detokenizer.push(i) for i in ids[1:]) == " 😀"


def test_flush_emits_an_unfinished_character_at_the_end(smol: Tokenizer) -> None:
    ids = smol.encode_text("ok 😀")
    detokenizer = IncrementalDetokenizer(smol, [])
    text = "".join(detokenizer.push(i) for i in ids[:-1])
    assert REPLACEMENT_CHAR not in text
    tail = detokenizer.flush()
    assert tail.endswith(REPLACEMENT_CHAR)
    assert text + tail == smol.decode(ids[:-1])
    assert detokenizer.flush() == ""


def test_special_tokens_produce_no_text(smol: Tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(smol, [])
    for special in sorted(smol.eos_token_ids) + [smol.bos_token_id or 1]:
        assert detokenizer.push(special) == ""
    assert detokenizer.flush() == ""


def test_random_token_sequences(smol: Tokenizer) -> None:
    rng = random.Random(1234)
    for _ in range(300):
        ids = [rng.randrange(smol.vocab_size) for _ in range(rng.randrange(1, 30))]
        assert "".join(_stream(smol, ids)) == smol.decode(ids)


def test_random_sequences_after_a_prompt(smol: Tokenizer) -> None:
    rng = random.Random(99)
    prompt = smol.encode_text("Once upon a time, ")
    for _ in range(200):
        ids = [rng.randrange(smol.vocab_size) for _ in range(rng.randrange(1, 30))]
        assert "".join(_stream(smol, ids, prompt)) == smol.decode(ids)


@pytest.mark.parametrize("text", ["hello world € 😀 café", "x\n  def f(x): return x", "é€😀"])
def test_byte_fallback_tokens(byte_fallback: Tokenizer, text: str) -> None:
    ids = byte_fallback.encode_text(text)[1:]  # without BOS: the output of a model
    assert any(t.startswith("<0x") for t in byte_fallback.hf_tokenizer.convert_ids_to_tokens(ids))
    deltas = _stream(byte_fallback, ids)
    assert "".join(deltas) == byte_fallback.decode(ids) == text
    assert not any(REPLACEMENT_CHAR in d for d in deltas)


def test_leading_space_is_rendered_in_prompt_context(byte_fallback: Tokenizer) -> None:
    # SentencePiece strips the space of a text's first `▁word`; after a prompt it is a
    # word boundary, and prompt + output must read as one text.
    prompt = byte_fallback.encode_text("say")
    ids = byte_fallback.encode_text("hello world")[1:]
    assert "".join(_stream(byte_fallback, ids)) == "hello world"
    deltas = _stream(byte_fallback, ids, prompt)
    assert deltas[0] == " hello"
    assert "".join(deltas) == " hello world"


# --- stop strings -------------------------------------------------------------------


def _run_stop(stops: list[str], deltas: list[str]) -> tuple[str, bool, list[str]]:
    matcher = StopMatcher(stops)
    emitted: list[str] = []
    stopped = False
    for delta in deltas:
        text, stopped = matcher.push(delta)
        emitted.append(text)
        if stopped:
            break
    if not stopped:
        emitted.append(matcher.flush())
    return "".join(emitted), stopped, emitted


def _reference(stops: list[str], text: str) -> tuple[str, bool]:
    hits = [text.find(s) for s in stops if s in text]
    return (text[: min(hits)], True) if hits else (text, False)


def test_stop_inside_one_delta() -> None:
    assert _run_stop(["STOP"], ["abc STOP def"])[:2] == ("abc ", True)


def test_stop_spanning_deltas_never_leaks() -> None:
    text = "abc STOP def"
    output, stopped, emitted = _run_stop(["STOP"], list(text))
    assert (output, stopped) == ("abc ", True)
    assert all("S" not in piece for piece in emitted)


def test_false_start_is_released() -> None:
    output, stopped, emitted = _run_stop(["STOP"], ["ab ST", "ART here"])
    assert (output, stopped) == ("ab START here", False)
    assert emitted[0] == "ab "  # "ST" held while it could still become "STOP"


def test_earliest_of_several_stop_strings_wins() -> None:
    assert _run_stop(["world", "lo w"], ["hel", "lo world"])[:2] == ("hel", True)


def test_overlapping_prefix() -> None:
    assert _run_stop(["aab"], ["a", "a", "a", "b", "c"])[:2] == ("a", True)


def test_after_stop_nothing_more_comes_out() -> None:
    matcher = StopMatcher(["x"])
    assert matcher.push("ax") == ("a", True)
    assert matcher.push("more") == ("", True)
    assert matcher.flush() == ""


def test_no_stop_strings_pass_through() -> None:
    matcher = StopMatcher([])
    assert matcher.push("anything") == ("anything", False)
    assert matcher.flush() == ""


def test_random_chunkings_match_reference() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        text = "".join(rng.choice("abc ") for _ in range(rng.randrange(0, 25)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randrange(1, 4)))]
        stops += ["".join(rng.choice("ab ") for _ in range(rng.randrange(1, 5)))]
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randrange(1, 6))))
        deltas = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        output, stopped, _ = _run_stop(stops, deltas)
        assert (output, stopped) == _reference(stops, text), (text, stops, deltas)


def test_stop_string_across_real_tokens(smol: Tokenizer) -> None:
    text = "The answer is 42.\nUser: and what about 😀?"
    stop = "\nUser:"
    ids = smol.encode_text(text)
    detokenizer = IncrementalDetokenizer(smol, [])
    deltas = [detokenizer.push(i) for i in ids]
    assert not any(stop in smol.decode([i]) for i in ids), "stop must span tokens"
    output, stopped, emitted = _run_stop([stop], deltas)
    assert (output, stopped) == ("The answer is 42.", True)
    assert not any("\n" in piece for piece in emitted)
    output, stopped, _ = _run_stop(["😀?"], deltas)  # spans the emoji's byte tokens
    assert (output, stopped) == ("The answer is 42.\nUser: and what about ", True)


def test_validate_stop_strings() -> None:
    assert validate_stop_strings(["a", "b", "a"]) == ("a", "b")
    with pytest.raises(ValueError, match="stop string 1 is empty"):
        validate_stop_strings(["ok", ""])
    with pytest.raises(ValueError, match=f"at most {MAX_STOP_STRINGS}"):
        validate_stop_strings([str(i) for i in range(MAX_STOP_STRINGS + 1)])
    with pytest.raises(ValueError, match=f"at most {MAX_STOP_STRING_CHARS}"):
        validate_stop_strings(["x" * (MAX_STOP_STRING_CHARS + 1)])
    with pytest.raises(ValueError, match="must not be empty"):
        StopMatcher([""])
