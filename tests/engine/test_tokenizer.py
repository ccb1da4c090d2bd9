"""Tokenizer: prompt encoding, chat rendering, EOS ids and the errors users can cause."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from engine.model.config import ModelFormatError
from engine.tokenizer import CHAT_ROLES, PromptError, Tokenizer
from tests.engine.tokenizer_folders import byte_fallback_tokenizer_dir, smollm2_tokenizer_dir


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return smollm2_tokenizer_dir(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def smol(smol_dir: Path) -> Tokenizer:
    return Tokenizer(smol_dir)


@pytest.fixture(scope="module")
def byte_fallback(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer(byte_fallback_tokenizer_dir(tmp_path_factory.getbasetemp()))


def _copy_tokenizer(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    return dst


def test_vocab_and_special_ids(smol: Tokenizer) -> None:
    assert smol.vocab_size == 49152
    im_end = smol.hf_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert smol.eos_token_ids == frozenset({im_end})
    assert smol.has_chat_template


def test_eos_ids_include_generation_config(smol_dir: Path, tmp_path: Path) -> None:
    folder = _copy_tokenizer(smol_dir, tmp_path / "model")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    assert Tokenizer(folder).eos_token_ids == frozenset({0, 2})
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert Tokenizer(folder).eos_token_ids == frozenset({2, 7})


def test_encode_text_matches_hf_defaults(smol: Tokenizer, smol_dir: Path) -> None:
    reference = AutoTokenizer.from_pretrained(str(smol_dir), local_files_only=True)
    for text in ("Hello world", " leading space", "日本語 😀 café\n\tcode()"):
        assert smol.encode_text(text) == reference.encode(text)
    assert smol.encode_text("Hello world") == [19556, 905]


def test_encode_text_adds_bos_when_the_model_wants_it(byte_fallback: Tokenizer) -> None:
    ids = byte_fallback.encode_text("hello world")
    assert ids[0] == byte_fallback.bos_token_id == 1
    assert byte_fallback.decode(ids) == "hello world"


def test_empty_text_prompt_is_refused(smol: Tokenizer) -> None:
    with pytest.raises(PromptError, match="empty"):
        smol.encode_text("")


def test_render_chat_uses_the_template_with_generation_prompt(
    smol: Tokenizer, smol_dir: Path
) -> None:
    messages = [("system", "Be brief."), ("user", "What is 2+2?")]
    ids = smol.render_chat(messages)
    reference = AutoTokenizer.from_pretrained(str(smol_dir), local_files_only=True)
    expected = reference.apply_chat_template(
        [{"role": r, "content": c} for r, c in messages],
        add_generation_prompt=True,
        tokenize=True,
    )["input_ids"]
    assert ids == list(expected)
    text = smol.decode(ids, skip_special_tokens=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    # One BOS-like marker per message plus the generation prompt: nothing doubled.
    assert ids.count(smol.hf_tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3


def test_render_chat_accepts_every_allowed_role(smol: Tokenizer) -> None:
    messages = [(role, f"a {role} message") for role in CHAT_ROLES]
    text = smol.decode(smol.render_chat(messages), skip_special_tokens=False)
    for role in CHAT_ROLES:
        assert f"<|im_start|>{role}\na {role} message<|im_end|>" in text


def test_bad_role_is_refused_with_a_sentence(smol: Tokenizer) -> None:
    with pytest.raises(PromptError) as info:
        smol.render_chat([("user", "hi"), ("wizard", "poof")])
    message = str(info.value)
    assert "'wizard'" in message and "message 1" in message
    for role in CHAT_ROLES:
        assert role in message
    assert isinstance(info.value, ValueError)


def test_empty_conversation_is_refused(smol: Tokenizer) -> None:
    with pytest.raises(PromptError, match="no messages"):
        smol.render_chat([])


def test_model_without_chat_template_is_refused(byte_fallback: Tokenizer) -> None:
    assert not byte_fallback.has_chat_template
    with pytest.raises(PromptError, match="no chat template"):
        byte_fallback.render_chat([("user", "hi")])


def test_template_exception_becomes_prompt_error(smol_dir: Path, tmp_path: Path) -> None:
    folder = _copy_tokenizer(smol_dir, tmp_path / "model")
    (folder / "chat_template.jinja").write_text(
        "{% if messages[0]['role'] == 'assistant' %}"
        "{{ raise_exception('Conversation must start with a user message') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    tokenizer = Tokenizer(folder)
    assert tokenizer.decode(tokenizer.render_chat([("user", "fine")])) == "fine"
    with pytest.raises(PromptError, match="must start with a user message"):
        tokenizer.render_chat([("assistant", "hello")])


def test_decode_skips_special_tokens(smol: Tokenizer) -> None:
    ids = smol.encode_text("Hi there") + sorted(smol.eos_token_ids)
    assert smol.decode(ids) == "Hi there"
    assert smol.decode(ids, skip_special_tokens=False) == "Hi there<|im_end|>"


def test_missing_tokenizer_is_a_model_format_error(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="cannot load the tokenizer"):
        Tokenizer(tmp_path)
