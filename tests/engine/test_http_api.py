"""The OpenAI-compatible HTTP API, driven by the real `openai` client (sync and async,
streaming and not) and by raw HTTP for the error shapes, against a real engine on
loopback. Answers are compared token for token with the same request over gRPC: one
request path, two envelopes."""

from __future__ import annotations

import asyncio
import json
import time
from http.client import HTTPConnection

import grpc
import openai
import pytest

from loraplex.v1 import inference_pb2
from tests.engine.http_engine import HttpEngine, http, http_engine
from tests.metrics_scrape import render, value

MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def engine(tiny_llama31_path, tmp_path_factory):
    # At most 2 calls in flight per tenant, so one test can reach the tenant cap.
    with http_engine(
        tiny_llama31_path, tmp_path_factory.mktemp("adapters"), max_tenant_requests=2
    ) as running:
        yield running


def _client(engine: HttpEngine, tenant: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=engine.base_url + "/v1", api_key=engine.keys[tenant])


def _grpc(engine: HttpEngine, adapter: str, max_tokens: int, tenant: str = "acme",
          text: str | None = None):  # fmt: skip
    request = inference_pb2.GenerateRequest(adapter=adapter)
    if text is None:
        for m in MESSAGES:
            request.chat.messages.add(role=m["role"], content=m["content"])
    else:
        request.text = text
    request.sampling.max_new_tokens = max_tokens
    request.sampling.ignore_eos = True
    return engine.running.generate(request, metadata=engine.grpc_auth(tenant))


def test_sync_client_chat_and_completions_match_grpc_streaming_or_not(engine) -> None:
    client = _client(engine)
    want = _grpc(engine, "acme/pirate", 6)
    base = _grpc(engine, "", 6)
    assert want.text != base.text  # the adapter changes the answer: `model` must select it

    answer = client.chat.completions.create(
        model="acme/pirate", messages=MESSAGES, max_completion_tokens=6, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert answer.object == "chat.completion" and answer.model == "acme/pirate"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == want.text
    assert answer.choices[0].finish_reason == "length"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (
        want.prompt_tokens, want.completion_tokens,
    )  # fmt: skip
    assert answer.usage.total_tokens == want.prompt_tokens + 6

    chunks = list(
        client.chat.completions.create(
            model="acme/pirate", messages=MESSAGES, max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])

    completion = client.completions.create(
        model=engine.base_model, prompt="Once upon a time", max_tokens=5, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    want_text = _grpc(engine, "", 5, text="Once upon a time").text
    assert completion.object == "text_completion"
    assert completion.choices[0].text == want_text
    stop = want_text.strip()[2:4]  # ends the text before its first occurrence
    stopped = client.completions.create(
        model=engine.base_model, prompt="Once upon a time", max_tokens=5, temperature=0,
        stop=[stop], extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert stopped.choices[0].text == want_text[: want_text.find(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=engine.base_model, prompt="Once upon a time", max_tokens=5, temperature=0,
        stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == want_text


def test_async_client_streams_concurrently_with_versioned_and_alias_names(engine) -> None:
    """Three streams at once (two tenants); `tenant/name@version` names the same adapter
    as its alias; seeded sampling repeats itself. The seeded streams run one after the
    other: run together, they may be batched with different rows (one admitted a step
    later), and on this random model's near-flat distribution the last-bit differences
    that makes in the logits can change which token a draw lands on."""
    want = _grpc(engine, "acme/pirate", 8).text
    want_globex = _grpc(engine, "globex/g", 8, tenant="globex").text

    async def stream(tenant: str, model: str, **sampling) -> str:
        client = openai.AsyncOpenAI(base_url=engine.base_url + "/v1", api_key=engine.keys[tenant])
        async with client:
            chunks = await client.chat.completions.create(
                model=model, messages=MESSAGES, max_tokens=8, stream=True,
                extra_body={"ignore_eos": True}, **sampling,
            )  # fmt: skip
            return "".join([c.choices[0].delta.content or "" async for c in chunks])

    async def both() -> list[str]:
        return await asyncio.gather(
            stream("acme", "acme/pirate@1", temperature=0),
            stream("acme", "acme/pirate", temperature=0),
            stream("globex", "globex/g", temperature=0),
        )

    assert asyncio.run(both()) == [want, want, want_globex]

    def seeded() -> str:
        return asyncio.run(stream("acme", "acme/pirate", temperature=1.0, top_p=0.9, seed=7))

    assert seeded() == seeded()


def test_models_lists_the_base_model_and_only_the_callers_adapters(engine) -> None:
    client = _client(engine)
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {engine.base_model, "acme/pirate@1", "acme/pirate"}
    assert models["acme/pirate"].model_extra["parent"] == engine.base_model
    assert models["acme/pirate@1"].model_extra["parent"] == engine.base_model
    assert models[engine.base_model].model_extra["parent"] is None
    assert client.models.retrieve("acme/pirate").id == "acme/pirate"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("globex/g")
    status, body = http("GET", engine.base_url + "/v1/models")
    assert status == 401 and body["error"]["type"] == "authentication_error"


def _chat(engine: HttpEngine, body: dict, key: str | None = "acme") -> tuple[int, dict]:
    full = {"model": engine.base_model, "messages": MESSAGES, "max_tokens": 2, **body}
    return http("POST", engine.base_url + "/v1/chat/completions", full,
                key=engine.keys[key] if key else None)  # fmt: skip


def test_errors_have_openai_shape_and_the_grpc_status_mapped(engine) -> None:
    url = engine.base_url + "/v1/chat/completions"
    cases = [
        (_chat(engine, {}, key=None), 401, "authentication_error", "missing credentials"),
        (http("POST", url, {"model": "x"}, key="lpx_00_11"), 401, "authentication_error",
         "is not accepted"),
        (_chat(engine, {"model": "globex/g"}), 404, "not_found_error",
         "is not available to tenant 'acme'"),
        (_chat(engine, {"n": 2}), 400, "invalid_request_error", "one choice per request"),
        (_chat(engine, {"temperature": -1}), 400, "invalid_request_error",
         "temperature is -1.0; it must be between 0"),
        (_chat(engine, {"messages": []}), 400, "invalid_request_error", "'messages' must be"),
        (_chat(engine, {"model": None}), 400, "invalid_request_error", "'model' is required"),
        (_chat(engine, {"max_tokens": True}), 400, "invalid_request_error", "max_tokens is"),
        (_chat(engine, {"logprobs": True}), 400, "invalid_request_error", "'logprobs' is not"),
        (http("POST", url, raw=b"{not json", key=engine.keys["acme"]), 400,
         "invalid_request_error", "not valid JSON"),
        (http("GET", engine.base_url + "/v1/nothing"), 404, "not_found_error", "Not Found"),
    ]  # fmt: skip
    for (status, body), want_status, want_type, want_text in cases:
        assert status == want_status, body
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == want_type and want_text in error["message"], error
    # The same sentence for another tenant's adapter and for one that never existed.
    other = _chat(engine, {"model": "globex/g"})[1]["error"]["message"]
    missing = _chat(engine, {"model": "acme/nothing"})[1]["error"]["message"]
    assert other.replace("globex/g", "N") == missing.replace("acme/nothing", "N")
    assert _chat(engine, {"n": 2})[1]["error"]["code"] == "invalid_argument"
    # The openai client raises its typed errors from these answers.
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=engine.base_url + "/v1", api_key="nope").models.list()
    with pytest.raises(openai.BadRequestError):
        _client(engine).chat.completions.create(model="acme/pirate", messages=[], max_tokens=1)


def test_harmless_fields_that_clients_send_are_tolerated(engine) -> None:
    status, body = _chat(engine, {
        "stream_options": {"include_usage": True},  # without stream
        "user": "u-1", "n": 1, "presence_penalty": 0, "frequency_penalty": 0.0,
        "logprobs": False, "response_format": {"type": "text"}, "some_new_field": [1, 2],
        "stop": "\n\n\n", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Tell me about "}, {"type": "text", "text": "the sea."}]}],
    })  # fmt: skip
    assert status == 200, body
    # The text parts were joined into the same prompt as MESSAGES.
    assert body["usage"]["prompt_tokens"] == _grpc(engine, "", 2).prompt_tokens


def test_the_tenant_cap_answers_429_and_other_tenants_still_get_in(engine) -> None:
    client = _client(engine)
    held = [
        client.chat.completions.create(
            model="acme/pirate", messages=MESSAGES, max_tokens=400, stream=True,
            extra_body={"ignore_eos": True},
        )
        for _ in range(2)
    ]  # fmt: skip
    for stream in held:
        next(iter(stream))  # both are in flight now
    status, body = _chat(engine, {})
    assert status == 429 and body["error"]["type"] == "rate_limit_error"
    assert "tenant 'acme' already has 2 requests in flight" in body["error"]["message"]
    assert _chat(engine, {}, key="globex")[0] == 200
    for stream in held:
        stream.close()
    deadline = time.monotonic() + 10
    while _chat(engine, {})[0] == 429 and time.monotonic() < deadline:
        time.sleep(0.05)  # the closed streams give their places back
    assert _chat(engine, {})[0] == 200


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_cancels_its_generation(engine, stream) -> None:
    registry = engine.running.parts.metrics.registry
    loop = engine.running.parts.engine  # read from this thread: its published snapshot
    cancelled = value(render(registry), "loraplex_engine_requests_finished_total", 0,
                      tenant="acme", reason="cancelled")  # fmt: skip
    connection = HTTPConnection("127.0.0.1", engine.http_port, timeout=30)
    body = {"model": "acme/pirate", "messages": MESSAGES, "max_tokens": 1000, "stream": stream,
            "ignore_eos": True}  # fmt: skip
    connection.request("POST", "/v1/chat/completions", json.dumps(body),
                       {"Authorization": f"Bearer {engine.keys['acme']}"})  # fmt: skip
    if stream:
        reply = connection.getresponse()
        assert reply.status == 200 and reply.readline().startswith(b"data: ")
    deadline = time.monotonic() + 10
    while loop.snapshot().num_running == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert loop.snapshot().num_running == 1  # generating now (1000 tokens take seconds)
    connection.sock.close()  # the client goes away mid-generation
    connection.close()
    deadline = time.monotonic() + 5
    while loop.snapshot().num_running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert loop.snapshot().num_running == 0
    samples = render(registry)
    assert value(samples, "loraplex_engine_requests_finished_total", tenant="acme",
                 reason="cancelled") == cancelled + 1  # fmt: skip


def test_the_status_table_maps_every_refusal_code() -> None:
    from engine.server.openai_errors import error_body

    for code, status in [
        (grpc.StatusCode.INVALID_ARGUMENT, 400), (grpc.StatusCode.FAILED_PRECONDITION, 400),
        (grpc.StatusCode.UNAUTHENTICATED, 401), (grpc.StatusCode.PERMISSION_DENIED, 403),
        (grpc.StatusCode.NOT_FOUND, 404), (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (grpc.StatusCode.UNAVAILABLE, 503), (grpc.StatusCode.INTERNAL, 500),
    ]:  # fmt: skip
        got, body = error_body(code, "a sentence")
        assert got == status and body["error"]["message"] == "a sentence"
        assert body["error"]["code"] == code.name.lower()
