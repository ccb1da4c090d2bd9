"""The adapter-root sandbox: a LoadAdapter path may read only files under the roots."""

from __future__ import annotations

import stat
from pathlib import Path

from engine.lora.adapter_config import CONFIG_NAME
from engine.lora.adapter_header import WEIGHTS_NAME
from engine.lora.errors import AdapterFormatError, AdapterPathError

_LOADED_FILES = (CONFIG_NAME, WEIGHTS_NAME)  # what load_adapter opens in the folder
# Kernel and device file systems: their "files" have no honest size or never end.
_SYSTEM_FOLDERS = (Path("/proc"), Path("/sys"), Path("/dev"))


def resolve_adapter_folder(path: Path | str, roots: tuple[Path, ...]) -> Path:
    """The resolved folder at `path`. AdapterPathError when it, or a file the loader
    opens in it, resolves outside every root in `roots` (none = no sandbox);
    AdapterFormatError when it is not a directory, names a system folder, or a file the
    loader opens is not a regular file (a FIFO or a device would block or never end)."""
    if not str(path) or "\x00" in str(path):
        raise AdapterFormatError("bad_path", "the adapter path is empty or holds a NUL byte")
    folder = Path(path).resolve()  # follows symlinks and `..`
    # And each file the loader opens: a symlinked file would let a load read any file.
    files = [(folder / name).resolve() for name in _LOADED_FILES if (folder / name).exists()]
    for target in (folder, *files):
        if any(target.is_relative_to(system) for system in _SYSTEM_FOLDERS):
            raise AdapterFormatError(
                "bad_path", f"adapter path {path} resolves to {target}, a system folder"
            )
        if roots and not any(target.is_relative_to(root) for root in roots):
            raise AdapterPathError(
                f"adapter path {path} resolves to {target}, outside the engine's adapter roots "
                f"({', '.join(map(str, roots))}); put its files (not links) in one"
            )
    if not folder.is_dir():
        raise AdapterFormatError("missing_folder", f"adapter path {path} is not a directory")
    for target in files:
        if not stat.S_ISREG(target.stat().st_mode):
            raise AdapterFormatError(
                "bad_path", f"{target} is not a regular file; an adapter's files must be"
            )
    return folder
