"""export/staging.py: an output directory is replaced only by a complete result."""

from __future__ import annotations

from pathlib import Path

import pytest

from nearvoice.export.errors import ExportError
from nearvoice.export.staging import staged_dir

MARKER = "manifest.json"


def test_a_complete_result_replaces_the_old_one(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER).write_text("old")
    with staged_dir(out, MARKER) as stage:
        (stage / "new").write_text("new")
    assert [p.name for p in out.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failure_leaves_the_old_result_and_no_staging(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER).write_text("old")
    with pytest.raises(RuntimeError), staged_dir(out, MARKER) as stage:
        (stage / "half").write_text("half")
        raise RuntimeError("disk full")
    assert [p.name for p in out.iterdir()] == [MARKER]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_interrupt_leaves_nothing_new(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), staged_dir(out, MARKER) as stage:
        (stage / "half").write_text("half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_the_staging_directory_is_hidden_beside_the_output(tmp_path: Path) -> None:
    with staged_dir(tmp_path / "out", MARKER) as stage:
        assert stage.parent == tmp_path
        assert stage.name.startswith(".out.staging-")


def test_a_directory_that_is_not_a_previous_result_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="refusing"), staged_dir(tmp_path, MARKER):
        pass
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_empty_directory_may_be_filled(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with staged_dir(out, MARKER) as stage:
        (stage / MARKER).write_text("{}")
    assert (out / MARKER).is_file()


def test_leftovers_of_killed_runs_are_removed(tmp_path: Path) -> None:
    dead = tmp_path / ".out.staging-999999999"
    dead.mkdir()
    with staged_dir(tmp_path / "out", MARKER) as stage:
        (stage / MARKER).write_text("{}")
    assert not dead.exists()
