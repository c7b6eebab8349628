"""Every option of every command says what it is for; the demo's --reset and --seed say
exactly what they do."""

from __future__ import annotations

import click
import pytest

from forecourt.cli import main
from tests.cli.support import clean_env, run

COMMANDS = sorted(main.commands)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_of_every_command_has_a_help_text(name: str) -> None:
    command = main.commands[name]
    assert command.help, f"{name} has no description"
    missing = [
        param.opts[0]
        for param in command.params
        if isinstance(param, click.Option) and not (param.help or "").strip()
    ]
    assert missing == [], f"forecourt {name}: options without help: {missing}"


def test_demo_reset_says_it_drops_the_tables_and_the_journals_of_the_work_folder() -> None:
    reset = next(p for p in main.commands["demo"].params if p.name == "reset")
    assert isinstance(reset, click.Option)
    text = reset.help or ""
    assert "tables" in text
    assert "journals" in text
    assert "--workdir" in text
    assert "must be empty" not in text


def test_demo_seed_says_counts_still_vary_with_wall_clock_timing() -> None:
    seed = next(p for p in main.commands["demo"].params if p.name == "seed")
    assert isinstance(seed, click.Option)
    assert "customers" in (seed.help or "")
    assert "wall-clock" in (seed.help or "")


def test_the_help_of_the_group_names_the_exit_statuses_and_the_debug_switch(tmp_path) -> None:
    done = run(["--help"], tmp_path, clean_env())
    assert done.code == 0
    assert "FORECOURT_DEBUG=1" in done.stdout
    assert "2: usage" in done.stdout
