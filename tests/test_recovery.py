"""The controller's side of spot interruptions, in pieces: --simulate-interruption's
syntax, what counts as a complete checkpoint, and swapping one in."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cloudtrain.errors import InputError
from cloudtrain.recovery import SimulatedInterruption, checkpoint_complete, last_checkpoint, swap_in


@pytest.mark.parametrize(
    ("text", "epoch", "seconds"),
    [("epoch:3", 3, None), ("90s", None, 90), (" epoch:12 ", 12, None), ("0s", None, 0)],
)
def test_interruption_syntax(text: str, epoch: int | None, seconds: int | None) -> None:
    parsed = SimulatedInterruption.parse(text)
    assert (parsed.epoch, parsed.seconds) == (epoch, seconds)
    assert SimulatedInterruption.parse(str(parsed)) == parsed


@pytest.mark.parametrize("text", ["epoch:0", "epoch:", "3", "90", "1m", "epoch:x", "-5s"])
def test_bad_interruption_refused(text: str) -> None:
    with pytest.raises(InputError, match="expected epoch:N or Ns"):
        SimulatedInterruption.parse(text)


def test_epoch_marker_is_keras_progress_line() -> None:
    at = SimulatedInterruption.parse("epoch:3")
    assert at.due_in_log("Epoch 3/10") and at.due_in_log("  Epoch 3/10\r")
    assert not at.due_in_log("Epoch 13/20") and not at.due_in_log("Epoch 2/10")
    assert not SimulatedInterruption.parse("5s").due_in_log("Epoch 3/10")


def write_checkpoint(folder: Path, epoch: int, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    listing = {name: {"size": len(data)} for name, data in files.items()}
    (folder / "manifest.json").write_text(json.dumps({"schema": 1, "epoch": epoch, "files": listing}))


def test_a_checkpoint_is_complete_only_with_its_manifest_and_every_file(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "good", 3, {"weights.h5": b"w", "sub/optimizer.npz": b"o"})
    assert (checkpoint_complete(tmp_path / "good") or {}).get("epoch") == 3
    write_checkpoint(tmp_path / "partial", 4, {"weights.h5": b"w"})
    (tmp_path / "partial" / "weights.h5").unlink()
    assert checkpoint_complete(tmp_path / "partial") is None
    (tmp_path / "nomanifest").mkdir()
    (tmp_path / "nomanifest" / "weights.h5").write_bytes(b"w")
    assert checkpoint_complete(tmp_path / "nomanifest") is None
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "manifest.json").write_text("{not json")
    assert checkpoint_complete(tmp_path / "garbled") is None


def test_swap_in_replaces_the_old_checkpoint_only_once_the_new_is_there(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "checkpoint", 2, {"weights.h5": b"old"})
    write_checkpoint(tmp_path / "incoming", 3, {"weights.h5": b"new"})
    swap_in(tmp_path / "incoming", tmp_path / "checkpoint")
    assert (tmp_path / "checkpoint" / "weights.h5").read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_a_swap_cut_short_still_leaves_a_checkpoint_to_restore(tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "checkpoint.old", 2, {"weights.h5": b"old"})  # renamed away, then killed
    found = last_checkpoint(tmp_path)
    assert found is not None and found[0] == tmp_path / "checkpoint.old" and found[1]["epoch"] == 2
    write_checkpoint(tmp_path / "checkpoint", 3, {"weights.h5": b"new"})
    assert (last_checkpoint(tmp_path) or (None, {}))[1]["epoch"] == 3
    assert last_checkpoint(tmp_path / "nothing") is None


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cloudtrain", *args], capture_output=True, text=True, timeout=120
    )


def test_simulate_interruption_needs_dry_run_and_a_valid_at(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("name: j\nrun: python t.py\n")
    real = cli("run", str(job), "--yes", "--simulate-interruption", "epoch:2")
    assert real.returncode == 2 and "--simulate-interruption needs --dry-run" in real.stderr
    bad = cli("run", str(job), "--dry-run", "--simulate-interruption", "soon")
    assert bad.returncode == 2 and "expected epoch:N or Ns" in bad.stderr
