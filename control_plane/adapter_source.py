"""Turn a RegisterAdapter `uri` into a local adapter folder under the adapter roots, and
adapter-folder errors into the control plane's refusals.

Only local paths and `file:` URIs are accepted. Where the folder may lie is the rule
the engine applies too (`engine.formats.adapter_folder`): under a configured root,
after resolving symlinks and `..`, for the folder and for each file in it that the
loader reads. The control plane reads these files and engines load them, so a
registration must not be able to point either at arbitrary paths.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse

from control_plane.errors import ErrorCode, ServiceError, invalid
from engine.formats.adapter_folder import require_roots, resolve_adapter_folder
from engine.formats.errors import (
    AdapterChanged,
    AdapterFormatError,
    AdapterIncompatible,
    AdapterMalformed,
    status_name,
)

# How the sentence of a refused registration begins; the status is the one both
# processes give the error's class (`engine.formats.errors.STATUS_NAMES`).
_LEADS: tuple[tuple[type[AdapterFormatError], str], ...] = (
    (AdapterIncompatible, "adapter {folder} is not compatible with base model {base_model!r}: "),
    (AdapterChanged, "adapter {folder} cannot be registered: "),
    (AdapterMalformed, "adapter {folder} cannot be registered: "),
)


def resolve_adapter_uri(uri: str, roots: Sequence[Path]) -> Path:
    """The resolved adapter folder; ServiceError naming what is wrong otherwise.

    INVALID_ARGUMENT for a malformed uri or a path that cannot hold an adapter,
    PERMISSION_DENIED for a folder, or a file the loader reads in it, that resolves
    outside the roots, NOT_FOUND when nothing is there, FAILED_PRECONDITION when no
    roots are configured or the path cannot be read.
    """
    path = _local_path(uri)
    try:
        require_roots(roots)
        return resolve_adapter_folder(path, roots)
    except AdapterFormatError as exc:
        raise adapter_refusal(exc, path) from exc
    except ValueError as exc:  # Path.resolve on what the OS cannot take as a path
        raise invalid(f"{uri!r} is not a usable path ({exc}); give an absolute path") from exc
    except OSError as exc:
        raise ServiceError(
            ErrorCode.FAILED_PRECONDITION,
            f"cannot read {uri}: {exc.strerror or exc}; check the path and that the control "
            "plane may read it",
        ) from exc


def adapter_refusal(exc: AdapterFormatError, folder: Path, base_model: str = "") -> ServiceError:
    """The refusal of a registration from `folder` (for `base_model`) that failed with `exc`."""
    lead = next((lead for cls, lead in _LEADS if isinstance(exc, cls)), "")
    code = ErrorCode(status_name(exc))
    return ServiceError(code, lead.format(folder=folder, base_model=base_model) + str(exc))


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
