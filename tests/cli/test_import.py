"""`forecourt import --sample` twice: the second says nothing changed and keeps the revision."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.cli.support import clean_env, run


def test_importing_the_sample_twice_keeps_the_revision_and_says_so(tmp_path: Path) -> None:
    env = clean_env(FORECOURT_DATABASE_URL=f"sqlite:///{tmp_path / 'hq.db'}")
    first = run(["import", "--sample"], tmp_path, env)
    assert first.code == 0, first.stderr
    assert "imported revision 1:" in first.stdout
    again = run(["import", "--sample"], tmp_path, env)
    assert again.code == 0, again.stderr
    assert again.stdout.startswith("unchanged: revision 1 kept")
    assert "Traceback" not in again.stderr


def test_no_log_file_is_tracked_in_the_repository() -> None:
    root = Path(__file__).resolve().parents[2]
    tracked = subprocess.run(
        ["git", "ls-files", "*.log"], cwd=root, capture_output=True, text=True, check=False
    )
    if tracked.returncode != 0:  # not a git checkout (an sdist): nothing is tracked
        return
    assert tracked.stdout.split() == []
