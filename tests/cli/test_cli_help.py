"""`--help` of every command in the tree, found by walking it (new commands are
covered without touching this file), and help text that survives rich markup."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import typer.main
from rich.text import Text

from trustplane.cli.main import app, run

# Typer's command objects are click's (vendored by Typer itself in recent
# versions), so they are read by their attributes, not their classes.
Command = Any


def _walk(command: Command, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    for name, sub in getattr(command, "commands", {}).items():
        yield from _walk(sub, (*path, name))


TREE = typer.main.get_command(app)
COMMANDS = list(_walk(TREE))


def _command(path: tuple[str, ...]) -> Command:
    command = TREE
    for name in path:
        command = command.commands[name]
    return command


def test_the_walk_finds_the_whole_tree() -> None:
    """A walk that found only the top would pass everything below vacuously."""
    assert ("image", "encrypt") in COMMANDS
    assert ("secret", "payload") in COMMANDS
    assert ("server",) in COMMANDS
    assert len(COMMANDS) > 30


@pytest.mark.parametrize("path", COMMANDS, ids=lambda path: " ".join(path) or "trustplane")
def test_help_of_every_command(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # long option names are not cut short
    with pytest.raises(SystemExit) as exited:
        run([*path, "--help"])
    out, err = capsys.readouterr()
    assert exited.value.code == 0, err
    assert err == ""
    assert " ".join(("Usage: trustplane", *path)) in " ".join(out.split())
    for param in _command(path).params:
        if param.param_type_name == "option" and not param.hidden:
            assert param.opts[0] in out, f"{param.opts[0]} is missing from the help"


@pytest.mark.parametrize("path", COMMANDS, ids=lambda path: " ".join(path) or "trustplane")
def test_help_text_is_not_eaten_as_markup(path: tuple[str, ...]) -> None:
    """Help is rich markup: "[/variant]" crashed it, and "[a-z]" would vanish silently.
    A literal "[" must be written "\\[" so that it shows."""
    command = _command(path)
    texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
    for text in texts:
        assert Text.from_markup(text).plain == text.replace("\\[", "["), text


def test_help_through_the_installed_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trustplane", "image", "encrypt", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "os/arch[/variant]" in result.stdout
