"""Turn a RegisterAdapter `uri` into a local adapter folder under the adapter roots.

Only local paths and `file:` URIs are accepted, and only under a configured root
(after resolving symlinks and `..`), for the folder and for each file in it that the
loader reads: the control plane reads these files and engines load them, so a
registration must not be able to point either at arbitrary paths.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse

from control_plane.errors import ErrorCode, ServiceError, invalid, not_found

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# The files an engine's loader opens; each must resolve under a root, not just the folder.
LOADED_FILES = (CONFIG_FILE, WEIGHTS_FILE)


def resolve_adapter_uri(uri: str, roots: Sequence[Path]) -> Path:
    """The resolved adapter folder; ServiceError naming what is wrong otherwise.

    INVALID_ARGUMENT for a malformed uri or a folder outside the roots,
    PERMISSION_DENIED for a file inside it that resolves (a symlink) outside them.
    """
    path = _local_path(uri)
    try:
        return _checked_folder(uri, path, roots)
    except ValueError as exc:  # Path.resolve on what the OS cannot take as a path
        raise invalid(f"{uri!r} is not a usable path ({exc}); give an absolute path") from exc
    except OSError as exc:
        raise ServiceError(
            ErrorCode.FAILED_PRECONDITION,
            f"cannot read {uri}: {exc.strerror or exc}; check the path and that the control "
            "plane may read it",
        ) from exc


def _checked_folder(uri: str, path: Path, roots: Sequence[Path]) -> Path:
    if not roots:
        raise ServiceError(
            ErrorCode.FAILED_PRECONDITION,
            "no adapter roots are configured; start the control plane with --adapter-root "
            "(or LORAPLEX_ADAPTER_ROOTS) naming the folders adapters may be registered from",
        )
    resolved_roots = [Path(root).resolve() for root in roots]
    resolved = path.resolve()
    if not _under(resolved, resolved_roots):
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
    for name in LOADED_FILES:
        target = (resolved / name).resolve()
        if (resolved / name).exists() and not _under(target, resolved_roots):
            raise ServiceError(
                ErrorCode.PERMISSION_DENIED,
                f"{resolved / name} is a link to {target}, outside the adapter roots; "
                "copy the file itself into the adapter folder",
            )
    return resolved


def config_sha256(folder: Path) -> str:
    """The sha256 of the folder's adapter_config.json, which engines check before they
    load the version; FAILED_PRECONDITION when the file cannot be read."""
    try:
        return hashlib.sha256((folder / CONFIG_FILE).read_bytes()).hexdigest()
    except OSError as exc:
        raise ServiceError(
            ErrorCode.FAILED_PRECONDITION,
            f"cannot read {folder / CONFIG_FILE}: {exc.strerror or exc}; check that the "
            "file exists and that the control plane may read it",
        ) from exc


def _under(path: Path, roots: Sequence[Path]) -> bool:
    return any(path.is_relative_to(root) for root in roots)


def _local_path(uri: str) -> Path:
    uri = uri.strip()
    if not uri:
        raise invalid("uri is empty; give a local path or file:// URI of a PEFT adapter folder")
    parsed = urlparse(uri)
    if parsed.scheme == "file":  # file:///abs, file://localhost/abs and file:/abs
        if parsed.netloc not in ("", "localhost"):
            raise invalid(f"{uri}: file URIs must name a local path (file:///...), not a host")
        uri = unquote(parsed.path)
    elif "://" in uri:
        raise invalid(
            f"{uri}: scheme {parsed.scheme!r} is not supported; only local paths and "
            "file:// URIs under the adapter roots are accepted"
        )
    path = Path(uri)
    if not path.is_absolute():
        raise invalid(f"{uri} is a relative path; give an absolute path under the adapter roots")
    return path
