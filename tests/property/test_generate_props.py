"""Random GenerateRequests and credentials against a real engine: every call ends
cleanly (tokens or a refusal with a sentence, never INTERNAL/UNKNOWN, never a hung
stream), what the engine accepts it finishes as asked, and it keeps serving."""

from __future__ import annotations

import time
from collections import Counter

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from loraplex.v1 import inference_pb2
from tests.engine_server import collect
from tests.property.checks import (
    CALL_TIMEOUT_S,
    RATE_LIMITED,
    check_refusal,
    property_settings,
)
from tests.property.conftest import (
    ADAPTER_NAMES,
    MAX_MODEL_LEN,
    ServedEngine,
    assert_still_serving,
    good_request,
)
from tests.property.strategies import (
    ascii_metadata,
    float32,
    lists,
    small_or_any_uint32,
    text,
    uint32,
    uint64,
)

DEFAULT_MAX_NEW_TOKENS = 256  # EngineConfig's default
ROLES = ("system", "user", "assistant", "tool")


# The fields an example may spoil; the others get values the engine must serve.
FIELDS = ("adapter", "prompt", "max_new_tokens", "temperature", "top_p", "top_k", "stop")
VOCAB = 49152  # the SmolLM2 tokenizer's, which the tiny model uses


@st.composite
def prompts(draw: st.DrawFn, request: inference_pb2.GenerateRequest, spoil: bool) -> None:
    """Sets a prompt on `request`: a short valid one of each kind, or, when `spoil`,
    any prompt at all (none, empty, unknown roles, ids past the vocabulary, 3 MB of
    text, a hundred thousand messages, nearly a million ids)."""
    kinds = ("none", "text", "chat", "token_ids") if spoil else ("text", "chat", "token_ids")
    kind = draw(st.sampled_from(kinds))
    if kind == "text":
        request.text = draw(
            st.one_of(text(), st.integers(20, 600_000).map(lambda n: "word " * n))
            if spoil
            else st.text(min_size=1, max_size=30)
        )
    elif kind == "chat":
        role = st.one_of(st.sampled_from(ROLES), text()) if spoil else st.sampled_from(ROLES)
        content = text() if spoil else st.text(max_size=30)
        messages = draw(
            lists(st.tuples(role, content), ("user", "hi"), max_huge=100_000)
            if spoil
            else st.lists(st.tuples(role, content), min_size=1, max_size=3)
        )
        request.chat.SetInParent()  # an empty conversation is a chat prompt too
        for role_name, message in messages:
            request.chat.messages.add(role=role_name, content=message)
    elif kind == "token_ids":
        token = st.one_of(st.integers(0, 300), uint32()) if spoil else st.integers(0, VOCAB - 1)
        request.token_ids.SetInParent()
        request.token_ids.ids.extend(
            draw(
                lists(token, 5, max_small=12, max_huge=900_000)
                if spoil
                else st.lists(token, min_size=1, max_size=12)
            )
        )


@st.composite
def generate_requests(draw: st.DrawFn, tenant: str) -> inference_pb2.GenerateRequest:
    """A request with a few (often no) fields spoiled by hostile values."""
    spoiled = draw(st.sets(st.sampled_from(FIELDS), max_size=3))

    def pick(field: str, good: st.SearchStrategy, bad: st.SearchStrategy):  # noqa: ANN202
        return draw(bad if field in spoiled else good)

    own = [n for n in ADAPTER_NAMES if n.startswith(tenant) and "old" not in n]
    request = inference_pb2.GenerateRequest(
        request_id=draw(text()),
        adapter=pick(
            "adapter",
            st.sampled_from(["", *own]),
            st.one_of(st.sampled_from(ADAPTER_NAMES), text()),
        ),
    )
    draw(prompts(request, "prompt" in spoiled))
    s = request.sampling
    s.max_new_tokens = pick("max_new_tokens", st.integers(1, 8), uint32())
    s.temperature = pick("temperature", st.floats(0, 2, width=32), float32())
    s.top_p = pick("top_p", st.floats(0, 1, width=32), float32())
    s.top_k = pick("top_k", st.integers(0, 60), small_or_any_uint32(60))
    seed = draw(st.none() | uint64())
    if seed is not None:
        s.seed = seed
    s.stop.extend(
        pick("stop", st.lists(st.text(min_size=1, max_size=4), max_size=3), lists(text(), "x"))
    )
    s.ignore_eos = draw(st.booleans())
    return request


def _check_finished(request: inference_pb2.GenerateRequest, responses: list) -> None:
    """An accepted request streams its tokens and ends as it was asked to."""
    last = responses[-1]
    assert last.finish_reason in (
        inference_pb2.FINISH_REASON_STOP,
        inference_pb2.FINISH_REASON_LENGTH,
    ), f"finished with {last.finish_reason}: {last.error!r}"
    assert all(r.finish_reason == 0 for r in responses[:-1])
    streamed = sum(len(r.token_ids) for r in responses)
    assert last.usage.completion_tokens == streamed
    assert all(r.request_id == (request.request_id or responses[0].request_id) for r in responses)
    room = MAX_MODEL_LEN - last.usage.prompt_tokens
    asked = request.sampling.max_new_tokens or min(DEFAULT_MAX_NEW_TOKENS, room)
    assert streamed <= min(asked, room)
    if request.sampling.ignore_eos and not request.sampling.stop:
        assert streamed == min(asked, room)
        assert last.finish_reason == inference_pb2.FINISH_REASON_LENGTH


def test_random_generate_requests_end_cleanly(served: ServedEngine) -> None:
    outcomes: Counter[str] = Counter()

    @property_settings(max_examples=150)
    @given(data=st.data(), tenant=st.sampled_from(("acme", "globex")))
    def examples(data: st.DataObject, tenant: str) -> None:
        request = data.draw(generate_requests(tenant))
        try:
            responses = list(
                served.running.inference.Generate(
                    request, metadata=served.tenant(tenant), timeout=CALL_TIMEOUT_S
                )
            )
        except grpc.RpcError as error:
            outcomes[check_refusal(error, "Generate").name] += 1
            return
        outcomes["served"] += 1
        _check_finished(request, responses)

    examples()
    # Not vacuous: the draws reached both the model and the refusals.
    assert outcomes["served"] and outcomes["INVALID_ARGUMENT"], outcomes
    assert_still_serving(served)


def test_random_credentials_are_refused_cleanly(served: ServedEngine) -> None:
    """Malformed, unknown and wrong keys are UNAUTHENTICATED (or, once too many failed
    from this address, refused before scrypt runs); the good keys keep working."""
    key_ids = [key.split("_")[1] for key in served.keys.values()]
    wrong_secret = st.tuples(st.sampled_from(key_ids), st.text(max_size=50)).map(
        lambda t: f"Bearer lpx_{t[0]}_{''.join(c for c in t[1] if c.isascii() and c.isprintable())}"
    )

    @property_settings(max_examples=40)
    @given(
        authorization=st.one_of(ascii_metadata(), wrong_secret),
        adapter=st.sampled_from(("", "acme/a", "globex-g")),
    )
    def examples(authorization: str, adapter: str) -> None:
        metadata = (("authorization", authorization),) if authorization else ()
        with pytest.raises(grpc.RpcError) as caught:
            collect(
                served.running.inference.Generate(
                    good_request(adapter), metadata=metadata, timeout=CALL_TIMEOUT_S
                )
            )
        assert check_refusal(caught.value, "Generate", also_ok=RATE_LIMITED) in (
            grpc.StatusCode.UNAUTHENTICATED,
            *RATE_LIMITED,
        )

    examples()
    assert_still_serving(served)


def test_a_prompt_far_beyond_the_window_is_refused_before_it_is_tokenized(
    served: ServedEngine,
) -> None:
    """3.9 MB of text (about 780k tokens; tokenizing it takes seconds) is refused at
    once, by its length in characters; so is a chat holding as much."""
    huge = "word " * 780_000
    chat = inference_pb2.GenerateRequest()
    for _ in range(10):
        chat.chat.messages.add(role="user", content=huge[: len(huge) // 10])
    for request in (inference_pb2.GenerateRequest(text=huge), chat):
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            collect(served.running.inference.Generate(request, metadata=served.tenant("acme")))
        elapsed = time.monotonic() - started
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "characters" in caught.value.details()
        assert f"context window is {MAX_MODEL_LEN} tokens" in caught.value.details()
        assert elapsed < 1.5, f"took {elapsed:.2f} s: the prompt was tokenized"


def test_a_long_prompt_is_refused_by_its_head_and_a_short_one_by_its_tokens(
    served: ServedEngine,
) -> None:
    """Text under the character cap but past the window is refused by tokenizing its
    head (the sentence names the head), and one barely past the window by its count."""
    cases = {
        "word " * 2_000: "its first",  # 10k characters, ~2k tokens: the head overflows
        "word " * 300: f"tokens but the context window is {MAX_MODEL_LEN}",
    }
    for prompt, words in cases.items():
        with pytest.raises(grpc.RpcError) as caught:
            collect(
                served.running.inference.Generate(
                    inference_pb2.GenerateRequest(text=prompt), metadata=served.tenant("acme")
                )
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in caught.value.details(), caught.value.details()
