"""Each run has one owner (issue #12, part 2): an exclusive lease file with a heartbeat, taken
over only when its heartbeat stopped; a writer that is not the owner never writes the record;
concurrent launches into one directory train each run once."""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from critbatch import records
from critbatch.config import RunConfig
from critbatch.monitor import RunBook
from critbatch.train import train_pack
from sweeps import lease as leases
from sweeps.jobs import run_group
from sweeps.status import sweep_status
from tests.helpers import REPO, SMALL


def small_config(**changes) -> dict:
    values = {"task": {"name": "digits", "hidden": 16}, "optimizer": {"name": "sgd", "lr": 0.2},
              "batch_size": 32, "seed": 0, "device": "cpu",
              "goals": {"metric": "train_error", "thresholds": [0.5, 0.3]}, "budget": {"max_steps": 60}}
    values.update(changes)
    return RunConfig.from_dict(values).to_dict()


def age(path: Path, seconds: float) -> None:
    """Make a file look last touched `seconds` ago."""
    then = time.time() - seconds
    os.utime(path, (then, then))


# ---------------------------------------------------------------------------------------------
# the lease
# ---------------------------------------------------------------------------------------------

def test_a_lease_is_exclusive_and_says_who_holds_it(tmp_path):
    first = leases.Lease.acquire(tmp_path / "run")
    try:
        assert first is not None and first.holds()
        held = json.loads((tmp_path / "run" / leases.LEASE_FILE).read_text())
        assert {"owner", "host", "pid", "token", "acquired"} <= set(held)
        assert held["pid"] == os.getpid() and held["owner"] == f"local-{os.getpid()}"
        assert leases.Lease.acquire(tmp_path / "run") is None  # a live owner: skipped
        info = leases.read_lease(tmp_path / "run")
        assert info.live and info.owner == held["owner"]
    finally:
        first.release()
    assert not (tmp_path / "run" / leases.LEASE_FILE).exists() and not first.holds()
    second = leases.Lease.acquire(tmp_path / "run")
    assert second is not None
    second.release()


def test_owner_id_comes_from_slurm(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    assert leases.owner_id() == "41"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "40")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert leases.owner_id() == "40_3"


def test_heartbeat_keeps_a_lease_fresh_and_a_stopped_one_is_taken_over(tmp_path):
    run = tmp_path / "run"
    owner = leases.Lease.acquire(run, heartbeat=0.05)
    path = run / leases.LEASE_FILE
    age(path, 10 * leases.STALE_SECONDS)
    time.sleep(0.3)  # the heartbeat touched it again
    assert time.time() - path.stat().st_mtime < 1
    assert leases.Lease.acquire(run) is None
    owner.stop_heartbeat()  # the owner hangs (or its node died): its heartbeat stops
    age(path, leases.STALE_SECONDS + 1)
    assert not leases.read_lease(run).live
    taker = leases.Lease.acquire(run)
    assert taker is not None and taker.holds()
    assert not owner.holds()  # the old owner knows it lost the run
    owner.release()  # and releasing what it no longer holds leaves the new lease alone
    assert taker.holds()
    events = [e["event"] for e in leases.history(run)]
    assert events == ["acquire", "takeover"]
    taker.release()


def test_a_requeued_slurm_job_takes_back_its_own_run(tmp_path, monkeypatch):
    """Preempted by SIGKILL and requeued, a job finds its own lease with a fresh heartbeat: the
    restart count tells it that the lease's process is its earlier incarnation, gone."""
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    first = leases.Lease.acquire(tmp_path / "run")
    first.stop_heartbeat()  # killed; its heartbeat is still fresh
    monkeypatch.setenv("SLURM_JOB_ID", "78")
    assert leases.Lease.acquire(tmp_path / "run") is None  # another job: the lease is live
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    again = leases.Lease.acquire(tmp_path / "run")
    assert again is not None and not first.holds()
    again.release()


def _race_for(run: str, barrier, results) -> None:
    barrier.wait()
    lease = leases.Lease.acquire(Path(run), heartbeat=0.05)
    results.put(lease is not None)
    time.sleep(0.5)  # hold it while the others try
    if lease is not None:
        lease.release()


@pytest.mark.parametrize("stale", [False, True])
def test_racing_claims_have_exactly_one_winner(tmp_path, stale):
    run = tmp_path / "run"
    if stale:  # a dead owner's lease, taken over by several claimants at once
        run.mkdir()
        (run / leases.LEASE_FILE).write_text(json.dumps({"owner": "dead", "host": "elsewhere", "pid": 1,
                                                         "token": "t0", "acquired": 0}))
        age(run / leases.LEASE_FILE, leases.STALE_SECONDS + 5)
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(6), context.Queue()
    workers = [context.Process(target=_race_for, args=(str(run), barrier, results)) for _ in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    assert sorted(results.get(timeout=5) for _ in workers) == [False] * 5 + [True]


def test_a_lease_on_this_machine_whose_process_is_gone_is_not_live(tmp_path):
    run = tmp_path / "run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run.mkdir()
    held = {"owner": "local-x", "host": leases.socket.gethostname(), "pid": int(dead.stdout), "token": "t",
            "acquired": time.time(), "pidns": leases.pid_namespace()}
    (run / leases.LEASE_FILE).write_text(json.dumps(held))
    assert not leases.read_lease(run).live  # fresh heartbeat, but its process is gone
    taker = leases.Lease.acquire(run)
    assert taker is not None
    taker.release()


# ---------------------------------------------------------------------------------------------
# a writer that is not the owner never writes the record
# ---------------------------------------------------------------------------------------------

def test_runbook_guard_refuses_to_write(tmp_path):
    config = RunConfig.from_dict(small_config())
    with pytest.raises(records.NotOwner):
        RunBook(config, tmp_path, guard=lambda: False)
    assert not (tmp_path / records.RECORD_FILE).exists()
    book = RunBook(config, tmp_path, guard=lambda: True)
    assert records.read_record(tmp_path / records.RECORD_FILE)["status"] == records.RUNNING
    book.guard = lambda: False
    with pytest.raises(records.NotOwner):
        book.finish(records.COMPLETED, "done")
    assert records.read_record(tmp_path / records.RECORD_FILE)["status"] == records.RUNNING


def test_training_that_lost_its_lease_stops_without_writing(tmp_path):
    saves = []

    def guard():  # the lease is lost after the first two writes
        saves.append(1)
        return len(saves) <= 2

    config = small_config(log={"checkpoint_seconds": 0.0}, budget={"max_steps": 2000},
                          goals={"metric": "train_error", "thresholds": [0.01]})
    with pytest.raises(records.NotOwner):
        train_pack([config], [tmp_path], guard=guard)
    record = records.read_record(tmp_path / records.RECORD_FILE)
    assert record["status"] == records.RUNNING and len(saves) >= 3  # refused from the third write on


def test_a_run_owned_elsewhere_is_skipped_and_reported(tmp_path):
    config = small_config()
    run = records.run_dir(tmp_path, config)
    other = leases.Lease.acquire(run)  # another launch (or job) owns it and is alive
    try:
        summaries = run_group(str(tmp_path), [config])
    finally:
        other.release()
    assert summaries[0]["status"] == "running elsewhere" and summaries[0]["owner"] == other.owner
    assert not (run / records.RECORD_FILE).exists()
    summaries = run_group(str(tmp_path), [config])  # now free: trained, and the lease let go
    assert summaries[0]["status"] in records.FINISHED_STATUSES
    assert not (run / leases.LEASE_FILE).exists()
    assert [e["event"] for e in leases.history(run)] == ["acquire", "release", "acquire", "train", "release"]


def test_status_running_means_a_fresh_heartbeat_not_a_fresh_record(tmp_path):
    config = small_config()
    run = records.run_dir(tmp_path, config)
    records.write_record(tmp_path / "sweep.json", {"runs": [{"name": run.name}]})
    record = records.new_record(config)
    record["summary"].update(host="elsewhere", pid=1)
    records.write_record(run / records.RECORD_FILE, record)
    age(run / records.RECORD_FILE, 3600)  # a slow run: its record was last rewritten an hour ago
    owner = leases.Lease.acquire(run, heartbeat=0.05)
    assert sweep_status(tmp_path)["runs"][run.name] == records.RUNNING
    owner.stop_heartbeat()
    age(run / leases.LEASE_FILE, leases.STALE_SECONDS + 1)
    assert sweep_status(tmp_path)["runs"][run.name] == "stale"  # the heartbeat stopped
    owner.release()
    assert sweep_status(tmp_path)["runs"][run.name] == "stale"  # no owner at all


# ---------------------------------------------------------------------------------------------
# three concurrent launches into one directory
# ---------------------------------------------------------------------------------------------

def trainings(sweep_dir: Path) -> dict[str, int]:
    """How often each run of the sweep was trained, from the lease history of its directory."""
    return {run.name: sum(e["event"] == "train" for e in leases.history(run))
            for run in (sweep_dir / records.RUNS_DIR).iterdir()}


@pytest.mark.slow
def test_three_concurrent_local_launches_train_each_run_once(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # one worker each: every run is trained in a launcher's own process, whose pid the record names
    command = [sys.executable, "-m", "sweeps.launch", *SMALL, f"hydra.sweep.dir={sweep_dir}"]
    launches = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(3)]
    outputs = [launch.communicate(timeout=300) for launch in launches]
    assert [launch.returncode for launch in launches] == [0, 0, 0], [err for _, err in outputs]
    assert trainings(sweep_dir) == {name: 1 for name in trainings(sweep_dir)} and len(trainings(sweep_dir)) == 4
    frame = records.load_sweep(sweep_dir)
    assert frame["run_id"].nunique() == 4 and frame.attrs["problems"] == []
    pids = {launch.pid for launch in launches}
    assert {json.loads(p.read_text())["summary"]["pid"] for p in sweep_dir.rglob(records.RECORD_FILE)} <= pids
    assert list(sweep_dir.rglob(leases.LEASE_FILE)) == []  # every owner let go
