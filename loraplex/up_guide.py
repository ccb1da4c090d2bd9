"""The text `loraplex up` prints once the stack serves: where everything is, and how to
call each demo adapter from the CLI, the Python SDK, grpcurl, curl and the openai client.

Every command is complete (endpoint, key, adapter), so it can be pasted as printed.
"""

from __future__ import annotations

import json
import shlex

from loraplex.up_facts import AdapterFacts, UpFacts

TRY_PROMPT = "What is the tallest mountain in the world?"


def summary(facts: UpFacts, facts_file: str) -> str:
    """Where the stack's parts are, with the secrets a caller needs."""
    http = f"{facts.engine_http}/v1 (OpenAI-compatible)" if facts.engine_http else "off"
    lines = [
        "stack up:",
        f"  control plane   {facts.control_plane}   admin token: {facts.admin_token}",
        f"  engine (gRPC)   {facts.engine}",
        f"  engine (HTTP)   {http}",
        f"  tenant          {facts.tenant}   API key: {facts.api_key}",
        f"  base model      {facts.base_model}",
        "  adapters        "
        + ", ".join(f"{a.name} ({a.effect}, {a.version})" for a in facts.adapters),
        "  logs            " + ", ".join(facts.logs.values()),
        f"  all of this as JSON: {facts_file}",
    ]
    return "\n".join(lines)


def how_to_call(facts: UpFacts) -> str:
    """Commands that call each adapter; the base model is adapter "" (gRPC) or
    model=<base model name> (HTTP)."""
    parts = []
    for adapter in facts.adapters:
        parts.append(f"\n--- {adapter.name}: {adapter.effect} ---")
        parts.extend(_calls(facts, adapter))
    parts.append(f'\nFor the base model: adapter "" on gRPC, model "{facts.base_model}" on HTTP.')
    return "\n".join(parts)


def _calls(facts: UpFacts, adapter: AdapterFacts) -> list[str]:
    key, name = facts.api_key, adapter.name
    # A chat turn, not plain text: the base model is chat-tuned, and so are the adapters.
    messages = json.dumps([{"role": "user", "content": TRY_PROMPT}])
    grpc_body = {
        "adapter": name,
        "chat": {"messages": [{"role": "user", "content": TRY_PROMPT}]},
        "sampling": {"maxNewTokens": 64},
    }
    lines = [
        "CLI:",
        f"  loraplex generate --target {facts.engine} --api-key {key} --chat "
        f"--adapter {name} {shlex.quote(TRY_PROMPT)}",
        "Python SDK:",
        "  from loraplex.client import Client",
        f"  client = Client({facts.engine!r}, api_key={key!r})",
        f"  print(client.chat({messages}, adapter={name!r}).text)",
        "grpcurl:",
        f"  grpcurl -plaintext -H {shlex.quote('authorization: Bearer ' + key)} "
        f"-d {shlex.quote(json.dumps(grpc_body))} {facts.engine} loraplex.v1.Inference/Generate",
    ]
    if not facts.engine_http:
        lines.append("(curl / openai: this engine has no HTTP API)")
        return lines
    # temperature 0 (greedy) as on gRPC; OpenAI's default of 1 samples.
    http_body = {
        "model": name,
        "messages": [{"role": "user", "content": TRY_PROMPT}],
        "temperature": 0,
    }
    lines += [
        "curl:",
        f"  curl {facts.engine_http}/v1/chat/completions "
        f"-H {shlex.quote('Authorization: Bearer ' + key)} "
        f"-H 'Content-Type: application/json' -d {shlex.quote(json.dumps(http_body))}",
        "openai client:",
        "  from openai import OpenAI",
        f"  client = OpenAI(base_url={facts.engine_http + '/v1'!r}, api_key={key!r})",
        f"  reply = client.chat.completions.create(model={name!r}, "
        f"messages={messages}, temperature=0)",
        "  print(reply.choices[0].message.content)",
    ]
    return lines
