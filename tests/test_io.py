"""Atomic writes: a replaced folder is never lost, and a killed writer's temps are cleaned up."""

import os
import subprocess
import sys

import pytest

from crosscoder.io import atomic_dir, atomic_path, clean_stale_temps


def test_replace_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target, replace=True) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash while writing")
    assert (target / "a.txt").read_text() == "old"
    with atomic_dir(target, replace=True) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_temps_of_a_dead_writer_are_removed_live_ones_kept(tmp_path):
    target = tmp_path / "out"
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    stale_dir = tmp_path / f".out.{dead_pid}.abc.tmp"
    stale_dir.mkdir()
    stale_file = tmp_path / f".out.{dead_pid}.xyz.tmp"
    stale_file.write_text("x")
    live = tmp_path / f".out.{os.getppid()}.keep.tmp"  # our parent process is alive
    live.mkdir()
    other = tmp_path / f".outer.{dead_pid}.k.tmp"  # another target's temp
    other.mkdir()
    assert sorted(p.name for p in clean_stale_temps(target)) == sorted([stale_dir.name, stale_file.name])
    assert live.exists() and other.exists()
    with atomic_path(tmp_path / "outer") as tmp:
        tmp.write_text("y")
    assert not other.exists()
