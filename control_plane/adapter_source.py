"""Turn a RegisterAdapter `uri` into a local adapter folder under the adapter roots.

Only local paths and `file://` URIs are accepted, and only under a configured root
(after resolving symlinks and `..`): the control plane reads these files and engines
load them, so a registration must not be able to point either at arbitrary paths.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse

from control_plane.errors import ErrorCode, ServiceError, invalid, not_found

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def resolve_adapter_uri(uri: str, roots: Sequence[Path]) -> Path:
    """The resolved adapter folder; ServiceError naming what is wrong otherwise."""
    path = _local_path(uri)
    if not roots:
        raise ServiceError(
            ErrorCode.FAILED_PRECONDITION,
            "no adapter roots are configured; start the control plane with --adapter-root "
            "(or LORAPLEX_ADAPTER_ROOTS) naming the folders adapters may be registered from",
        )
    resolved = path.resolve()
    resolved_roots = [Path(root).resolve() for root in roots]
    if not any(resolved.is_relative_to(root) for root in resolved_roots):
        allowed = ", ".join(str(root) for root in resolved_roots)
        raise invalid(f"{uri} is outside the adapter roots ({allowed}); copy the adapter under one")
    if not resolved.exists():
        raise not_found(f"adapter folder {resolved} does not exist")
    if not resolved.is_dir():
        raise invalid(f"{resolved} is not a folder; expected a PEFT adapter folder")
    if not (resolved / CONFIG_FILE).is_file():
        raise not_found(f"{resolved} has no {CONFIG_FILE}; save the adapter with save_pretrained()")
    if not (resolved / WEIGHTS_FILE).is_file() and not (resolved / "adapter_model.bin").is_file():
        raise not_found(
            f"{resolved} has no {WEIGHTS_FILE}; save the adapter with save_pretrained()"
        )
    return resolved


def config_sha256(folder: Path) -> str:
    return hashlib.sha256((folder / CONFIG_FILE).read_bytes()).hexdigest()


def _local_path(uri: str) -> Path:
    uri = uri.strip()
    if not uri:
        raise invalid("uri is empty; give a local path or file:// URI of a PEFT adapter folder")
    if "://" in uri:
        parsed = urlparse(uri)
        if parsed.scheme != "file":
            raise invalid(
                f"{uri}: scheme {parsed.scheme!r} is not supported; only local paths and "
                "file:// URIs under the adapter roots are accepted"
            )
        if parsed.netloc not in ("", "localhost"):
            raise invalid(f"{uri}: file URIs must name a local path (file:///...), not a host")
        uri = unquote(parsed.path)
    path = Path(uri)
    if not path.is_absolute():
        raise invalid(f"{uri} is a relative path; give an absolute path under the adapter roots")
    return path
