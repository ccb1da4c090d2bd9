"""What `loraplex up` made, as a JSON file a script can read (and the next `up` reuses).

The file holds secrets (the admin token and the demo API key), so it is written with
mode 0600, atomically: a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

FACTS_FILE = "up.json"


@dataclass(frozen=True)
class AdapterFacts:
    name: str  # what `adapter` (gRPC) or `model` (HTTP) names: "demo/pirate"
    version: str  # the registered version: "demo/pirate@1"
    effect: str  # what a person sees: "answers like a pirate"
    path: str  # the folder the control plane registered


@dataclass(frozen=True)
class UpFacts:
    control_plane: str  # HOST:PORT, gRPC (ControlPlane admin API)
    engine: str  # HOST:PORT, gRPC (Inference, EngineAdmin)
    engine_http: str | None  # base URL of the OpenAI-compatible API, None without one
    admin_token: str
    tenant: str
    api_key: str
    api_key_id: str
    base_model: str  # the base model's name: `model` on HTTP for no adapter
    adapters: list[AdapterFacts]
    logs: dict[str, str]  # component -> log file
    pids: dict[str, int] = field(default_factory=dict)  # component -> process id, while up
    data_dir: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def facts_path(data_dir: Path) -> Path:
    return data_dir / FACTS_FILE


def write_facts(path: Path, facts: UpFacts) -> None:
    """Replace `path` with `facts`, readable by its owner only."""
    staging = path.with_name(f".{path.name}.tmp")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(facts.to_json())
    os.chmod(staging, 0o600)  # O_CREAT's mode does not apply to a file left by a crash
    os.replace(staging, path)


def read_facts(path: Path) -> UpFacts | None:
    """The facts a previous `up` wrote, or None if there are none or they are unreadable
    (then `up` makes new ones: a lost file costs a new API key, nothing else)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        adapters = [AdapterFacts(**a) for a in raw.pop("adapters")]
        return UpFacts(adapters=adapters, **raw)
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
