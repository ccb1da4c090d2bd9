"""The README's configuration reference stays true to the code: every flag of the
server commands has a row with its real default, and every LORAPLEX_* variable the
code reads has a row, so a new flag or variable cannot ship undocumented."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from loraplex.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
# Each command's flags, and the README subsection whose table lists them.
COMMANDS = {
    ("engine", "serve"): "### `loraplex engine serve`",
    ("control-plane", "serve"): "### `loraplex control-plane serve` and `migrate`",
    ("control-plane", "migrate"): "### `loraplex control-plane serve` and `migrate`",
}


def _section(heading: str) -> str:
    """The README from `heading` to the next heading of the same or a higher level."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index(f"\n{heading}\n")
    level = heading.split(" ", 1)[0]
    ends = [readme.find(f"\n{'#' * n} ", start + 1) for n in range(1, len(level) + 1)]
    ends = [e for e in ends if e >= 0]
    return readme[start : min(ends) if ends else len(readme)]


def _subparser(path: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def _documented_default(action: argparse.Action) -> str | None:
    """How the reference writes the default, or None where it describes it in words
    (read from the environment, empty, computed)."""
    if isinstance(action, argparse._StoreTrueAction):
        return "off"
    if isinstance(action.default, bool) or action.default in (None, ""):
        return None
    if isinstance(action.default, int | float):
        return f"{action.default:g}"
    if isinstance(action.default, str) and not action.default.startswith(str(Path.home())):
        return action.default
    return None


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_every_server_flag_has_a_row_with_its_real_default(path, monkeypatch):
    for name in ("LORAPLEX_ADMIN_TOKEN", "LORAPLEX_CONTROL_PLANE", "LORAPLEX_DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    reference = _section(COMMANDS[path])
    for action in _subparser(path)._actions:
        if not action.option_strings or action.dest == "help":
            continue
        flag = action.option_strings[0]
        rows = re.findall(rf"^\| `{re.escape(flag)}` \| ([^|]+) \|", reference, re.MULTILINE)
        assert rows, f"README's configuration reference has no row for {' '.join(path)} {flag}"
        expected = _documented_default(action)
        if expected is not None and "$LORAPLEX" not in "".join(rows):
            firsts = [re.match(r"\s*`([^`]*)`|\s*(\S+)", row) for row in rows]
            shown = {m[1] or m[2] for m in firsts if m}
            assert expected in shown, (
                f"{' '.join(path)} {flag}: README says {shown}, code {expected}"
            )


def test_every_environment_variable_the_code_reads_has_a_row():
    read = set()
    for folder in ("loraplex", "control_plane", "engine"):
        for source in (ROOT / folder).rglob("*.py"):
            text = source.read_text()
            read.update(re.findall(r'(?:environ\.get|_env)\(\s*"(LORAPLEX_[A-Z_]+)"', text))
    assert read, "found no environment variables: the pattern no longer matches the code"
    table = _section("### Environment variables")
    missing = sorted(name for name in read if f"| `{name}` |" not in table)
    assert not missing, f"README's environment variable table lacks {missing}"
