"""Base models: what adapters are validated against and engines are matched by."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy.exc import IntegrityError

from control_plane.errors import already_exists, invalid, not_found, precondition
from control_plane.models import BaseModel
from control_plane.records import BaseModelRecord
from control_plane.repositories.audit import AuditRepository
from control_plane.repositories.catalog import BaseModelRepository
from control_plane.repositories.fleet import EngineRepository
from control_plane.services.common import ServiceContext, check_base_model_name
from engine.formats.checkpoint import model_fingerprint
from engine.model.config import ModelFormatError, load_model_config, parse_model_config

MAX_LORA_RANK_LIMIT = 1024


class BaseModelService:
    def __init__(self, ctx: ServiceContext, default_max_lora_rank: int) -> None:
        self._ctx = ctx
        self._default_max_lora_rank = default_max_lora_rank

    def register_base_model(
        self, name: str, path: str, max_lora_rank: int, actor: str
    ) -> BaseModelRecord:
        check_base_model_name(name)
        max_rank = max_lora_rank or self._default_max_lora_rank
        if not 1 <= max_rank <= MAX_LORA_RANK_LIMIT:
            raise invalid(f"max_lora_rank must be between 1 and {MAX_LORA_RANK_LIMIT}")
        folder = Path(path)
        if "\x00" in path or not folder.is_absolute():
            raise invalid(f"{path!r} is not an absolute path to a model folder")
        try:
            if not folder.is_dir():
                raise not_found(f"model folder {path} does not exist")
            config = load_model_config(folder)
            raw = read_raw_config(folder)
            fingerprint = model_fingerprint(config, folder)
            resolved = str(folder.resolve())
        except ModelFormatError as exc:
            raise precondition(f"{path} cannot be served: {exc}") from exc
        except OSError as exc:
            raise precondition(
                f"cannot read {path}: {exc.strerror or exc}; check the path and that the "
                "control plane may read it"
            ) from exc
        now = self._ctx.clock()
        try:
            with self._ctx.sessions.begin() as session:
                models = BaseModelRepository(session)
                if models.get(name) is not None:
                    raise already_exists(f"base model {name!r} already exists")
                same = models.by_fingerprint(fingerprint)
                if same is not None:
                    raise already_exists(
                        f"these weights are already registered as base model {same.name!r}"
                    )
                model = models.add(
                    name=name,
                    fingerprint=fingerprint,
                    architecture=config.architecture,
                    hidden_size=config.hidden_size,
                    num_layers=config.num_layers,
                    num_heads=config.num_heads,
                    num_kv_heads=config.num_kv_heads,
                    head_dim=config.head_dim,
                    intermediate_size=config.intermediate_size,
                    vocab_size=config.vocab_size,
                    max_lora_rank=max_rank,
                    path=resolved,
                    config=raw,
                    created_at=now,
                )
                linked = EngineRepository(session).link_fingerprint(fingerprint, model.id)
                AuditRepository(session).record(
                    actor,
                    "base_model.register",
                    name,
                    now,
                    {"fingerprint": fingerprint, "path": path},
                )
                record = _record(model, linked)
        except IntegrityError as exc:
            raise already_exists(f"base model {name!r} or its weights already exist") from exc
        self._ctx.on_change()
        return record

    def list_base_models(self) -> list[BaseModelRecord]:
        with self._ctx.sessions.begin() as session:
            return [_record(m, n) for m, n in BaseModelRepository(session).list()]


def read_raw_config(folder: Path) -> dict[str, object]:
    """config.json as stored: `parse_model_config` rebuilds the ModelConfig from it."""
    raw = json.loads((folder / "config.json").read_text())
    parse_model_config(raw, name=folder.name)
    return dict(raw)


def _record(model: BaseModel, num_engines: int) -> BaseModelRecord:
    return BaseModelRecord(
        name=model.name,
        fingerprint=model.fingerprint,
        architecture=model.architecture,
        hidden_size=model.hidden_size,
        num_layers=model.num_layers,
        num_heads=model.num_heads,
        num_kv_heads=model.num_kv_heads,
        head_dim=model.head_dim,
        intermediate_size=model.intermediate_size,
        vocab_size=model.vocab_size,
        max_lora_rank=model.max_lora_rank,
        path=model.path,
        created_at=model.created_at,
        num_engines=num_engines,
    )
