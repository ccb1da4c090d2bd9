"""The PEFT adapter folder: its file names, where it may lie, and which files it needs.

An adapter folder is untrusted input (SECURITY.md): whoever registers or loads one
names a path, and only files under the configured adapter roots may be read. The rule,
the same in the control plane and the engine: the folder and each file the loader
opens resolve (symlinks and `..` followed) under a root, are no system files, and are
a directory and regular files. Torch-free.
"""

from __future__ import annotations

import stat
from collections.abc import Sequence
from pathlib import Path

from engine.formats.errors import (
    AdapterFilesMissing,
    AdapterMalformed,
    AdapterOutsideRoots,
    AdapterPathInvalid,
    NoAdapterRoots,
)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"  # what PEFT writes without safe_serialization
LOADED_FILES = (CONFIG_FILE, WEIGHTS_FILE)  # each must resolve under a root, not just the folder
# Kernel and device file systems: their "files" have no honest size or never end.
_SYSTEM_FOLDERS = (Path("/proc"), Path("/sys"), Path("/dev"))


def require_roots(roots: Sequence[Path]) -> None:
    """NoAdapterRoots when `roots` is empty: a server that reads the paths its callers
    name must be told where they may lie, so with no roots it reads none."""
    if not roots:
        raise NoAdapterRoots(
            "no_roots",
            "no adapter roots are configured, so no adapter folder may be read: start the "
            "server with --adapter-root DIR (or LORAPLEX_ADAPTER_ROOTS=DIR[:DIR...]) naming "
            "the folders adapters may be read from",
        )


def resolve_adapter_folder(path: Path | str, roots: Sequence[Path]) -> Path:
    """The resolved folder at `path`, checked against `roots` (none: no sandbox, for a
    caller that trusts every path; servers call `require_roots` first).

    AdapterPathInvalid when the path is empty, holds a NUL byte, names a system folder
    or a non-directory, or a file the loader opens is not a regular file;
    AdapterOutsideRoots when the folder or such a file resolves outside every root;
    AdapterFilesMissing when nothing is at the path.
    """
    if not str(path) or "\x00" in str(path):
        raise AdapterPathInvalid(
            "bad_path",
            f"adapter path {str(path)!r} is not a usable path: it is empty or holds a NUL byte",
        )
    resolved_roots = [Path(root).resolve() for root in roots]
    folder = Path(path).resolve()  # follows symlinks and `..`
    # And each file the loader opens: a symlinked file would let a load read any file.
    files = [(folder / name).resolve() for name in LOADED_FILES if (folder / name).exists()]
    for target in (folder, *files):
        if any(target.is_relative_to(system) for system in _SYSTEM_FOLDERS):
            raise AdapterPathInvalid(
                "bad_path", f"adapter path {path} resolves to {target}, a system folder"
            )
        if resolved_roots and not any(target.is_relative_to(root) for root in resolved_roots):
            raise AdapterOutsideRoots(
                "outside_roots",
                f"adapter path {path} resolves to {target}, outside the adapter roots "
                f"({', '.join(map(str, resolved_roots))}); put its files (not links) in one",
            )
    if not folder.exists():
        raise AdapterFilesMissing(
            "missing_folder", f"adapter path {path} is not a directory: it does not exist"
        )
    if not folder.is_dir():
        raise AdapterPathInvalid("bad_path", f"adapter path {path} is not a directory")
    for target in files:
        if not stat.S_ISREG(target.stat().st_mode):
            raise AdapterPathInvalid(
                "bad_path", f"{target} is not a regular file; an adapter's files must be"
            )
    return folder


def config_file(folder: Path) -> Path:
    """The folder's adapter_config.json; AdapterFilesMissing if absent."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise AdapterFilesMissing(
            "missing_config",
            f"{folder} has no {CONFIG_FILE}; save the adapter with PEFT's save_pretrained() "
            f"so the folder holds {CONFIG_FILE} and {WEIGHTS_FILE}",
        )
    return path


def weights_file(folder: Path) -> Path:
    """The folder's adapter_model.safetensors; AdapterMalformed when it holds pickled
    weights instead (never unpickled: that runs code), AdapterFilesMissing if absent."""
    folder = Path(folder)
    path = folder / WEIGHTS_FILE
    if path.is_file():
        return path
    if (folder / PICKLE_WEIGHTS_FILE).is_file():
        raise AdapterMalformed(
            "bin_weights",
            f"{folder} holds {PICKLE_WEIGHTS_FILE} (pickle) instead of {WEIGHTS_FILE}; "
            "re-save the adapter with save_pretrained(..., safe_serialization=True)",
        )
    raise AdapterFilesMissing(
        "missing_weights",
        f"{folder} has no {WEIGHTS_FILE}; save the adapter with PEFT's save_pretrained()",
    )


def unreadable_weights(path: Path, exc: OSError) -> AdapterMalformed:
    """The error for a weights file the OS would not let us read in full."""
    return AdapterMalformed("corrupt_weights", f"cannot read {path}: {exc}")
