"""The README's quick start stays true: CI runs its test command, and its main job names files that exist."""

from __future__ import annotations

import re

from conftest import REPO


def _quick_start() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = text.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_quick_start_is_two_commands_and_ci_runs_the_test_command():
    commands = _quick_start()
    assert len(commands) == 2, commands
    assert commands[1] in (REPO / ".ci" / "run").read_text()


def test_quick_start_main_job_refers_to_existing_files():
    main_job = _quick_start()[0]
    paths = re.findall(r"(?:bundles|tools)/[\w/.\-]+\.(?:py|json)", main_job)
    assert paths and all((REPO / p).is_file() for p in paths), paths
