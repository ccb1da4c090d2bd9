"""Readable plain-text tables of the SDK's control-plane results, for the CLI."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from loraplex.client import Adapter, AdapterVersion, ApiKey, BaseModel, Engine, Tenant


def render(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.strftime("%Y-%m-%d %H:%M:%S")


def tenants(items: Sequence[Tenant]) -> str:
    return render(
        ("NAME", "STATE", "ADAPTERS", "KEYS", "CREATED"),
        [
            (
                t.name,
                t.state,
                f"{t.num_adapters}/{t.max_adapters}",
                t.num_active_keys,
                when(t.created_at),
            )
            for t in items
        ],
    )


def keys(items: Sequence[ApiKey]) -> str:
    return render(
        ("KEY ID", "TENANT", "STATE", "CREATED", "LAST USED", "REVOKED"),
        [
            (
                k.key_id,
                k.tenant,
                "revoked" if k.revoked else "active",
                when(k.created_at),
                when(k.last_used_at),
                when(k.revoked_at),
            )
            for k in items
        ],
    )


def base_models(items: Sequence[BaseModel]) -> str:
    return render(
        ("NAME", "ARCHITECTURE", "HIDDEN", "LAYERS", "MAX RANK", "ENGINES", "FINGERPRINT"),
        [
            (
                m.name,
                m.architecture,
                m.hidden_size,
                m.num_layers,
                m.max_lora_rank,
                m.num_engines,
                m.fingerprint[:16],
            )
            for m in items
        ],
    )


def versions(items: Sequence[AdapterVersion]) -> str:
    return render(
        (
            "ADAPTER",
            "VERSION",
            "STATE",
            "CURRENT",
            "RANK",
            "ALPHA",
            "TARGETS",
            "BASE MODEL",
            "ENGINES",
            "SHA256",
            "NOTE",
        ),
        [
            (
                f"{v.tenant}/{v.name}",
                v.version,
                v.state,
                "*" if v.current else "",
                v.rank,
                f"{v.alpha:g}",
                ",".join(v.target_modules),
                v.base_model,
                v.num_engines_loaded,
                v.sha256[:12],
                v.failure_reason[:60],
            )
            for v in items
        ],
    )


def adapters(items: Sequence[Adapter]) -> str:
    return versions([v for a in items for v in a.versions])


def engines(items: Sequence[Engine]) -> str:
    return render(
        (
            "ID",
            "ADDRESS",
            "STATE",
            "BASE MODEL",
            "DEVICE",
            "ADAPTERS",
            "PLACED",
            "RUNNING",
            "WAITING",
            "LAST HEARTBEAT",
        ),
        [
            (
                e.engine_id,
                e.address,
                e.state,
                e.base_model or "-",
                e.device,
                e.num_adapters,
                e.num_placements,
                e.running_requests,
                e.waiting_requests,
                when(e.last_heartbeat_at),
            )
            for e in items
        ],
    )
