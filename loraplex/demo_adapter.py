"""The demo adapters `loraplex up` serves: real PEFT LoRAs of the default model, trained
by scripts/train_demo_adapters.py on demo/data/ and shipped in demo/adapters/.

`pirate` answers as a pirate, `french` answers in French: effects a person sees in the
first words of an answer, which is what a demo of per-request adapters needs.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parents[1] / "demo"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class DemoAdapter:
    name: str  # the adapter's name under the demo tenant: `demo/<name>`
    effect: str  # what a person sees, in a few words


DEMO_ADAPTERS = (
    DemoAdapter("pirate", "answers like a pirate"),
    DemoAdapter("french", "answers in French"),
)

# Prompts that are not in demo/data/: what the training script and the tests ask, so
# the effect they show is learned, not recalled.
HELD_OUT_PROMPTS = (
    "How do I make a cup of tea?",
    "Why is the sky blue?",
    "What is the tallest mountain in the world?",
    "Can you recommend a good book?",
)


class DemoAdaptersMissing(RuntimeError):
    """The trained files are not where this checkout keeps them; the message says why."""


def shipped_folder(adapter: DemoAdapter, demo_dir: Path = DEMO_DIR) -> Path:
    """The committed folder of `adapter`; raises DemoAdaptersMissing if incomplete."""
    folder = demo_dir / "adapters" / adapter.name
    missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
    if missing:
        raise DemoAdaptersMissing(
            f"{folder} lacks {', '.join(missing)}; `loraplex up` runs from a source "
            "checkout (make up), or retrain with scripts/train_demo_adapters.py"
        )
    return folder


def install_demo_adapters(adapter_root: Path, demo_dir: Path = DEMO_DIR) -> dict[str, Path]:
    """Copy each shipped adapter to `adapter_root/demo-<name>` unless an identical copy is
    there; return {name: folder}. Copies, not links: the control plane and the engine
    accept only folders under their adapter root, and a copy under it cannot change
    behind the registered checksum when the checkout does."""
    installed = {}
    for adapter in DEMO_ADAPTERS:
        source = shipped_folder(adapter, demo_dir)
        target = adapter_root / f"demo-{adapter.name}"
        if not _same_files(source, target):
            staging = adapter_root / f".demo-{adapter.name}.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            for name in ADAPTER_FILES:
                shutil.copyfile(source / name, staging / name)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        installed[adapter.name] = target
    return installed


def _same_files(source: Path, target: Path) -> bool:
    return all(
        (target / name).is_file() and _sha256(source / name) == _sha256(target / name)
        for name in ADAPTER_FILES
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
