"""`loraplex up` as a new user meets it: the trained demo adapters change what the real
engine answers, the facts file says how to reach everything, a second `up` reuses what
the first made, and Ctrl-C stops every process `up` started."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from engine.config import EngineConfig
from loraplex.demo_adapter import DEMO_ADAPTERS, HELD_OUT_PROMPTS, shipped_folder
from loraplex.up_facts import read_facts
from loraplex.v1 import control_plane_pb2 as cp
from loraplex.v1 import control_plane_pb2_grpc as cp_grpc
from loraplex.v1 import engine_admin_pb2 as admin_pb
from loraplex.v1 import inference_pb2, inference_pb2_grpc
from tests.engine_server import collect, running_engine

LORAPLEX = [sys.executable, "-m", "loraplex.cli"]
FRENCH_WORDS = {
    "le", "la", "les", "de", "des", "du", "un", "une", "est", "et", "en", "dans", "pour",
    "que", "qui", "sur", "par", "avec", "plus", "il", "elle", "au", "aux", "pas", "ce",
    "vous", "sont", "son", "sa",
}  # fmt: skip
PIRATE_WORDS = {"arr", "arrr", "matey", "ahoy", "ye", "hearty", "yer"}


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-zàâçéèêëîïôûùüÿœ]+", text.lower()))


def chat(prompt: str, adapter: str = "", new_tokens: int = 32) -> inference_pb2.GenerateRequest:
    request = inference_pb2.GenerateRequest(
        adapter=adapter, sampling=inference_pb2.SamplingParams(max_new_tokens=new_tokens)
    )
    request.chat.messages.add(role="user", content=prompt)
    return request


@pytest.mark.slow
def test_demo_adapters_change_what_the_engine_answers(default_model_path):
    adapter_root = shipped_folder(DEMO_ADAPTERS[0]).parent
    config = EngineConfig(
        model_path=default_model_path,
        port=0,
        kv_cache_tokens=2048,
        max_loras=2,
        max_lora_rank=8,
        adapter_roots=(adapter_root,),
    )
    with running_engine(config) as running:
        for demo in DEMO_ADAPTERS:
            loaded = running.admin.LoadAdapter(
                admin_pb.LoadAdapterRequest(
                    adapter_id=f"demo/{demo.name}@1",
                    path=str(shipped_folder(demo)),
                    aliases=[f"demo/{demo.name}"],
                )
            )
            assert loaded.outcome == admin_pb.LOAD_OUTCOME_LOADED
        for prompt in HELD_OUT_PROMPTS[1:3]:  # greedy, prompts not in demo/data
            base = collect(running.inference.Generate(chat(prompt))).text
            pirate = collect(running.inference.Generate(chat(prompt, "demo/pirate"))).text
            french = collect(running.inference.Generate(chat(prompt, "demo/french"))).text
            shown = f"{prompt!r}\nbase: {base!r}\npirate: {pirate!r}\nfrench: {french!r}"
            assert not words(base) & PIRATE_WORDS and len(words(base) & FRENCH_WORDS) < 2, shown
            assert len(words(pirate) & PIRATE_WORDS) >= 2, shown
            assert len(words(french) & FRENCH_WORDS) >= 3, shown
            assert not words(french) & {"the", "is", "and", "of"}, shown


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def up_command(data_dir: Path, ports: dict[str, int], *extra: str) -> list[str]:
    return [
        *LORAPLEX,
        "up",
        "--device",
        "cpu",
        "--data-dir",
        str(data_dir),
        "--control-plane-port",
        str(ports["cp"]),
        "--engine-port",
        str(ports["engine"]),
        "--engine-http-port",
        str(ports["http"]),
        *extra,
    ]


def answers(stdout: str) -> dict[str, str]:
    """`[adapter: X]` -> the streamed answer below it."""
    found = re.findall(r"\[adapter: ([^\]]+)\]\n(.*?)\n\n(?:> |stack up:)", stdout, re.DOTALL)
    return {adapter: text for adapter, text in found}


def wait_for(predicate, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_up_writes_its_facts_reuses_them_and_stops_everything(tmp_path, default_model_path):
    ports = {"cp": free_port(), "engine": free_port(), "http": free_port()}
    first = subprocess.run(
        up_command(tmp_path, ports, "--demo-only"), capture_output=True, text=True, timeout=500
    )
    assert first.returncode == 0, first.stdout + first.stderr
    facts_file = tmp_path / "up.json"
    assert f"all of this as JSON: {facts_file}" in first.stdout
    assert facts_file.stat().st_mode & 0o777 == 0o600  # it holds the admin token and a key
    raw = json.loads(facts_file.read_text())
    assert raw["control_plane"] == f"127.0.0.1:{ports['cp']}"
    assert raw["engine"] == f"127.0.0.1:{ports['engine']}"
    engine_help = subprocess.run(
        [*LORAPLEX, "engine", "serve", "--help"], capture_output=True, text=True
    ).stdout
    has_http = "--http-port" in engine_help
    assert raw["engine_http"] == (f"http://127.0.0.1:{ports['http']}" if has_http else None)
    assert raw["tenant"] == "demo" and raw["api_key"].startswith("lpx_") and raw["admin_token"]
    assert raw["base_model"] == default_model_path.name
    assert [(a["name"], a["version"]) for a in raw["adapters"]] == [
        ("demo/pirate", "demo/pirate@1"),
        ("demo/french", "demo/french@1"),
    ]
    assert all(Path(log).is_file() for log in raw["logs"].values())
    # What it printed: the demo answers show each adapter's effect, and every way to call it.
    shown = answers(first.stdout)
    assert set(shown) == {"base model", "demo/pirate", "demo/french"}, first.stdout
    assert words(shown["demo/pirate"]) & PIRATE_WORDS, shown
    assert len(words(shown["demo/french"]) & FRENCH_WORDS) >= 3, shown
    for adapter in ("demo/pirate", "demo/french"):
        assert f"--api-key {raw['api_key']} --chat --adapter {adapter}" in first.stdout
        assert f"adapter={adapter!r}).text)" in first.stdout  # the Python SDK line
        assert f'"adapter": "{adapter}"' in first.stdout  # the grpcurl body
        if has_http:
            assert f'"model": "{adapter}"' in first.stdout  # the curl body
    if has_http:
        assert f"OpenAI(base_url='http://127.0.0.1:{ports['http']}/v1'" in first.stdout
    assert all(not alive(pid) for pid in raw["pids"].values())

    # The second `up` serves on: same token, tenant, key and versions, nothing duplicated.
    log = tmp_path / "second.out"
    with log.open("w") as out:
        second = subprocess.Popen(up_command(tmp_path, ports), stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(
            lambda: "serving; Ctrl-C stops everything" in log.read_text(), "the second up to serve"
        )
        again = read_facts(facts_file)
        assert again is not None
        reused = (again.admin_token, again.tenant, again.api_key, again.api_key_id)
        assert reused == (raw["admin_token"], raw["tenant"], raw["api_key"], raw["api_key_id"])
        assert [a.version for a in again.adapters] == ["demo/pirate@1", "demo/french@1"]
        assert set(again.pids.values()).isdisjoint(raw["pids"].values())
        _check_control_plane_holds_one_of_each(again)
        _check_the_reused_key_works(again)
    finally:
        second.send_signal(signal.SIGINT)  # what Ctrl-C sends
        code = second.wait(60)
    assert code == 0, log.read_text()
    assert all(not alive(pid) for pid in again.pids.values()), log.read_text()


def _check_control_plane_holds_one_of_each(facts) -> None:
    auth = [("authorization", f"Bearer {facts.admin_token}")]
    with grpc.insecure_channel(facts.control_plane) as channel:
        admin = cp_grpc.ControlPlaneStub(channel)
        keys = admin.ListApiKeys(cp.ListApiKeysRequest(tenant="demo"), metadata=auth).keys
        assert [k.key_id for k in keys if not k.revoked] == [facts.api_key_id]
        for adapter in facts.adapters:
            tenant, name = adapter.name.split("/")
            found = admin.GetAdapter(cp.GetAdapterRequest(tenant=tenant, name=name), metadata=auth)
            assert [v.version for v in found.versions] == [1]


def _check_the_reused_key_works(facts) -> None:
    metadata = [("authorization", f"Bearer {facts.api_key}")]
    with grpc.insecure_channel(facts.engine) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        french = collect(
            stub.Generate(chat(HELD_OUT_PROMPTS[0], "demo/french", 16), metadata=metadata)
        )
        assert words(french.text) & FRENCH_WORDS, french.text
    if facts.engine_http:
        body = {
            "model": "demo/pirate",
            "messages": [{"role": "user", "content": HELD_OUT_PROMPTS[0]}],
            "max_tokens": 16,
        }
        request = urllib.request.Request(
            f"{facts.engine_http}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={
                "Authorization": f"Bearer {facts.api_key}",
                "Content-Type": "application/json",
            },
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            reply = json.loads(response.read())
        assert words(reply["choices"][0]["message"]["content"]) & PIRATE_WORDS, reply
