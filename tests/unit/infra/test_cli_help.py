"""Every `fleet` command's --help renders (typer + rich): a help text with rich markup in it,
such as square brackets, used to crash `fleet grant --help`."""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

import infra.cli
from infra.cli.app import app


def command_paths(command: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """The path of ``command`` and of every command and subcommand beneath it (a group has
    ``commands``; typer vendors its own click, so no isinstance on click's classes)."""
    paths = [path]
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        paths += command_paths(sub, (*path, name))
    return paths


PATHS = command_paths(typer.main.get_command(app))


def test_the_walk_finds_every_command_group() -> None:
    names = {path[0] for path in PATHS if path}
    assert {"up", "down", "status", "grant", "token", "device", "ota", "twin", "alerts"} <= names
    assert {("device", "suspend"), ("device", "revoke"), ("device", "activate")} <= set(PATHS)
    assert ("ota", "artifact", "add") in PATHS


def test_every_group_module_is_wired() -> None:
    """Each typer app defined in a module of infra/cli/ is reachable from `fleet`: a command
    group added as a module but not wired into infra/cli/app.py would be missing here."""
    wired: set[int] = set()

    def walk(typer_app: typer.Typer) -> None:
        wired.add(id(typer_app))
        for group in typer_app.registered_groups:
            assert group.typer_instance is not None
            walk(group.typer_instance)

    walk(app)
    for info in pkgutil.iter_modules(infra.cli.__path__):
        if info.name == "__main__":
            continue
        module = importlib.import_module(f"infra.cli.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, typer.Typer):
                assert id(value) in wired, f"infra.cli.{info.name}.{name} is not wired into fleet"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: " ".join(p) or "fleet")
def test_every_help_renders(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, f"fleet {' '.join(path)} --help: {result.output}"
    assert "Usage:" in result.output
    assert len(result.output.strip()) > 50
