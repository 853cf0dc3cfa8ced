"""Checkpoint and resume: a run interrupted at any step (once or twice) and resumed gives the record
of its uninterrupted twin: the same steps to every goal, the same B_simple, the same curve."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess

import numpy as np
import pytest

from critbatch import records
from critbatch.train import CHECKPOINT_FILE, Interrupt, Interrupted, train_pack

TIMING = {"wall_time", "setup_seconds", "pid"}


class InterruptAt(Interrupt):
    """Asks training to stop after it has looked `at` times, i.e. at step `at` (the loop looks once
    per step), as a signal arriving then would."""

    def __init__(self, at: int):
        super().__init__()
        self.at, self.looks = at, 0

    @property
    def requested(self):
        self.looks += 1
        return "TEST" if self.looks > self.at else None

    @requested.setter
    def requested(self, value):
        pass


def untimed(record: dict) -> dict:
    """The record as written (NaN as null, so that equal records compare equal), without timings."""
    record = json.loads(json.dumps(records._json_safe(record)))
    for key in TIMING | {"resumed_at"}:
        record["summary"].pop(key, None)
        record["curve"].pop(key, None)
    for goal in record["goals"]:
        goal.pop("wall_time", None)
    return record


DIGITS = {"task": {"name": "digits", "hidden": 32}, "batch_size": 32, "device": "cpu",
          "goals": {"metric": "train_error", "thresholds": [0.3, 0.1, 0.05]}, "budget": {"max_steps": 600}}
CASES = {
    "sgd": [{**DIGITS, "optimizer": {"name": "sgd", "lr": 0.5}}],
    "dropout_momentum_shuffled": [{**DIGITS, "task": {"name": "digits", "hidden": 32, "dropout": 0.2},
                                   "optimizer": {"name": "momentum", "lr": 0.05}, "sampling": "epoch_shuffle"}],
    "packed_adam_with_a_diverging_member": [{**DIGITS, "optimizer": {"name": "adam", "lr": lr}}
                                            for lr in (0.002, 0.01, 1.0)],
    "linreg_evaluated_goals": [{"task": {"name": "linreg", "dim": 16}, "batch_size": 16, "device": "cpu",
                                "optimizer": {"name": "sgd", "lr": 0.2},
                                "goals": {"metric": "exact_excess_loss", "thresholds": [1.0, 0.3, 0.1]},
                                "budget": {"max_steps": 800},
                                # B_noise on batches of its own: their stream is resumed too
                                "noise_scale": {"hessian_every": 1, "hessian_micro_batch": 8, "hessian_draws": 2}}],
}


@pytest.mark.parametrize("shares", [(0.37,), (0.23, 0.41)], ids=["once", "twice"])
@pytest.mark.parametrize("case", CASES)
def test_resumed_runs_equal_their_uninterrupted_twins(case, shares, tmp_path):
    """Interrupted at these shares of the longest run's steps (each counted from the resume)."""
    configs = CASES[case]
    twin = train_pack(configs, [tmp_path / "twin" / str(i) for i in range(len(configs))])
    length = max(r["summary"]["steps"] for r in twin)
    stops = [int(share * length) for share in shares]
    dirs = [tmp_path / "resumed" / str(i) for i in range(len(configs))]

    def unfinished():  # what a relaunch trains again: the runs whose records are not final
        todo = [(c, d) for c, d in zip(configs, dirs) if not records.is_complete(d / records.RECORD_FILE)]
        return [c for c, _ in todo], [d for _, d in todo]

    for at in stops:
        with pytest.raises(Interrupted, match="resumes"):
            train_pack(*unfinished(), interrupt=InterruptAt(at))
        todo_configs, todo_dirs = unfinished()
        assert (todo_dirs[0] / CHECKPOINT_FILE).exists()
        partial = records.read_record(todo_dirs[0] / records.RECORD_FILE)
        assert partial["status"] == records.INTERRUPTED and partial["summary"]["steps"] <= sum(stops)
    todo_configs, todo_dirs = unfinished()
    train_pack(todo_configs, todo_dirs)
    assert not any((d / CHECKPOINT_FILE).exists() for d in dirs)  # over: nothing left to resume
    resumed = [records.read_record(d / records.RECORD_FILE) for d in dirs]
    assert all(records.read_record(d / records.RECORD_FILE)["summary"]["resumed_at"] == list(np.cumsum(stops))
               for d in todo_dirs)  # it did resume, from where it stopped
    for a, b in zip(twin, resumed):
        assert untimed(a) == untimed(b)
    assert any(goal["reached"] for record in twin for goal in record["goals"])  # the comparison means something
    assert length > sum(stops) > 10  # interrupted mid-run, not after


def test_a_checkpoint_of_other_runs_is_not_used(tmp_path):
    configs = CASES["sgd"]
    with pytest.raises(Interrupted):
        train_pack(configs, [tmp_path], interrupt=InterruptAt(40))
    other = [{**configs[0], "optimizer": {"name": "sgd", "lr": 0.25}}]  # another run, same directory
    record = train_pack(other, [tmp_path])[0]
    fresh = train_pack(other, [tmp_path / "fresh"])[0]
    assert untimed(record) == untimed(fresh)


class FillDiskAt(InterruptAt):
    """At step `at`, fills the disk but for `room` bytes and asks training to stop, so that the
    checkpoint written on the way out starts, then meets a full disk halfway."""

    def __init__(self, at: int, disk, room: int):
        super().__init__(at)
        self.disk, self.room = disk, room

    @property
    def requested(self):
        self.looks += 1
        if self.looks <= self.at:
            return None
        filler = self.disk / "filler"
        with open(filler, "wb", buffering=0) as handle:  # unbuffered: nothing left to flush
            with contextlib.suppress(OSError):
                while True:
                    handle.write(b"\0" * 4096)
        os.truncate(filler, filler.stat().st_size - self.room)
        return "TEST"

    @requested.setter
    def requested(self, value):
        pass


def test_a_checkpoint_on_a_full_disk_says_so_and_keeps_the_last_good_one(tmp_path):
    """A real full disk (a small tmpfs). torch.save straight into a file that fills up halfway
    fails with an opaque "enforce fail at inline_container.cc"; the error must name the full disk."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        configs, run = CASES["sgd"], disk / "run"
        with pytest.raises(Interrupted):
            train_pack(configs, [run], interrupt=InterruptAt(20))
        good = (run / CHECKPOINT_FILE).read_bytes()
        with pytest.raises(OSError) as failure:
            train_pack(configs, [run], interrupt=FillDiskAt(20, disk, room=len(good) // 2))
        assert failure.value.errno == errno.ENOSPC and "No space left on device" in str(failure.value)
        assert (run / CHECKPOINT_FILE).read_bytes() == good  # the last good checkpoint, untouched
        assert not list(run.glob(".*.tmp"))  # no half-written file left behind
        # the half-written checkpoint is gone, so there is room again for the record of the failure
        failed = records.read_record(run / records.RECORD_FILE)
        assert failed["status"] == records.FAILED and "No space left on device" in failed["summary"]["error"]
    finally:
        subprocess.run(["umount", "-l", str(disk)])
