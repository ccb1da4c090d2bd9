"""The ways an adapter folder can be refused, one class per kind of failure.

Every class is an AdapterFormatError, so `except AdapterFormatError` still catches all
of them. Both processes answer a class (never a message or a reason) with the gRPC
status `STATUS_NAMES` gives it; the classes are cut so that a class means one thing to
the caller:

| class                | status              | what the caller can do                      |
|----------------------|---------------------|---------------------------------------------|
| NoAdapterRoots       | FAILED_PRECONDITION | the operator configures roots               |
| AdapterOutsideRoots  | PERMISSION_DENIED   | put the files (not links) under a root      |
| AdapterPathInvalid   | INVALID_ARGUMENT    | name a real folder of regular files         |
| AdapterFilesMissing  | NOT_FOUND           | save the adapter with save_pretrained()     |
| AdapterMalformed     | INVALID_ARGUMENT    | fix or re-save the adapter's files          |
| AdapterUnsafePattern | INVALID_ARGUMENT    | list module names instead of the regex      |
| AdapterIncompatible  | FAILED_PRECONDITION | use an adapter trained for this base/engine |
| AdapterChanged       | FAILED_PRECONDITION | register the changed files as a new version |

Torch-free (and grpc-free: the statuses are named, each edge turns a name into its code).
"""

from __future__ import annotations


class AdapterFormatError(ValueError):
    """The adapter folder cannot be read or served.

    `reason` is a short stable code (e.g. "dora", "shape_mismatch") for logs and tests;
    the message is a sentence saying what is wrong and what to do about it.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class NoAdapterRoots(AdapterFormatError):
    """No adapter roots are configured where a caller's path must lie under one."""


class AdapterOutsideRoots(AdapterFormatError, PermissionError):
    """The folder, or a file the loader opens in it, resolves (symlinks and `..`
    followed) outside every adapter root: the caller may not read there."""


class AdapterPathInvalid(AdapterFormatError):
    """The path cannot hold an adapter: empty, a NUL byte, a system folder, not a
    directory, or a file the loader opens is not a regular file (a FIFO or a device
    would block a read or never end)."""


class AdapterFilesMissing(AdapterFormatError):
    """The folder, its adapter_config.json or its adapter_model.safetensors is absent."""


class AdapterMalformed(AdapterFormatError):
    """The files are not a LoRA adapter that can be served on any base model: invalid
    config or JSON, a corrupt, truncated or pickled weights file, tensors that disagree
    with the config or with each other, weights that are not finite."""


class AdapterUnsafePattern(AdapterMalformed):
    """A regex of adapter_config.json that cannot be matched in linear time, or an
    oversized one: refused whatever the base model."""


class AdapterIncompatible(AdapterFormatError):
    """A well-formed adapter that cannot run on this base model or engine: shapes or
    layer count of another base model, a rank above the limit, or a PEFT feature
    (DoRA, modules_to_save, LoRA options) the serving kernels do not implement."""


class AdapterChanged(AdapterFormatError):
    """A file's sha256 differs from the one pinned at registration: a version is
    immutable."""


# The table above; a subclass without a line answers as its nearest base.
STATUS_NAMES: dict[type[AdapterFormatError], str] = {
    AdapterFormatError: "INVALID_ARGUMENT",
    NoAdapterRoots: "FAILED_PRECONDITION",
    AdapterOutsideRoots: "PERMISSION_DENIED",
    AdapterPathInvalid: "INVALID_ARGUMENT",
    AdapterFilesMissing: "NOT_FOUND",
    AdapterMalformed: "INVALID_ARGUMENT",
    AdapterIncompatible: "FAILED_PRECONDITION",
    AdapterChanged: "FAILED_PRECONDITION",
}


def status_name(exc: AdapterFormatError) -> str:
    """The name of the gRPC status that answers `exc` (e.g. "NOT_FOUND")."""
    return next(STATUS_NAMES[c] for c in type(exc).__mro__ if c in STATUS_NAMES)
