"""sweeps: grid expansion, validation before submission, local launch, relaunch, status."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from critbatch import records
from sweeps.grid import SweepError, centred_lr, expand, group_runs, lr_grid
from sweeps.status import sweep_status

REPO = Path(__file__).resolve().parents[1]

# A sweep of the digits task small enough for a test: 2 batch sizes x 2 lrs, easy goals.
SMALL = ["sweep.batch_sizes=[16,64]", "sweep.lr.count=2", "goals.thresholds=[0.3,0.2]",
         "budget.max_steps=400", "launcher.threads=1"]


def launch(*overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sweeps.launch", *overrides], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def base_cfg(**changes) -> dict:
    cfg = {
        "task": {"name": "digits", "hidden": 32, "depth": 1, "dropout": 0.0},
        "optimizer": {"name": "sgd", "lr": 0.1},
        "goals": {"metric": "train_error", "thresholds": [0.3, 0.2]},
        "budget": {"max_steps": 100},
        "seed": 0,
        "sweep": {"batch_sizes": [8, 32], "seeds": [0, 1],
                  "lr": {"centre": {"eps_star": 1.0, "b_star": 32, "alpha": 1.0}, "factor": 2.0, "count": 3}},
    }
    cfg.update(changes)
    return cfg


def test_centred_grid_follows_the_papers_rule():
    for batch_size in (8, 32, 1024):
        grid = lr_grid(batch_size, {"centre": {"eps_star": 2.0, "b_star": 64, "alpha": 0.5},
                                    "factor": 3.0, "count": 3})
        centre = 2.0 / (1 + 64 / batch_size) ** 0.5
        assert grid[1] == pytest.approx(centre, rel=1e-5)
        assert grid[0] == pytest.approx(centre / 3, rel=1e-5) and grid[2] == pytest.approx(centre * 3, rel=1e-5)
    # An even count straddles the centre symmetrically in log space.
    even = lr_grid(16, {"centre": {"eps_star": 1.0, "b_star": 16, "alpha": 1.0}, "factor": 4.0, "count": 2})
    assert math.sqrt(even[0] * even[1]) == pytest.approx(centred_lr(16, 1.0, 16, 1.0), rel=1e-5)


def test_explicit_grids_per_batch_size():
    assert lr_grid(8, {"values": [0.1, 0.2]}) == [0.1, 0.2]
    assert lr_grid(8, {"values": {8: [0.3], 16: [0.5]}}) == [0.3]
    with pytest.raises(SweepError, match="no entry for batch size 32"):
        lr_grid(32, {"values": {8: [0.3]}})


def test_expand_gives_every_batch_size_lr_and_seed_once():
    runs = expand(base_cfg())
    assert len(runs) == 2 * 3 * 2
    assert len({r.run_id for r in runs}) == len(runs)
    assert {(r.config["batch_size"], r.config["seed"]) for r in runs} == {(8, 0), (8, 1), (32, 0), (32, 1)}
    groups = group_runs(runs, "batch_size")
    assert [len(g) for g in groups] == [6, 6]
    assert all(len({r.config["batch_size"] for r in g}) == 1 for g in groups)
    assert len(group_runs(runs, "run")) == 12 and len(group_runs(runs, "all")) == 1


@pytest.mark.parametrize("change, field", [
    ({"sweep": {"batch_sizes": []}}, "sweep.batch_sizes"),
    ({"sweep": {"batch_sizes": [8], "lr": {"centre": {"eps_star": -1, "b_star": 1, "alpha": 1}}}}, "eps_star"),
    ({"sweep": {"batch_sizes": [8], "lr": {"centre": {"eps_star": 1, "b_star": 1, "alpha": 1}, "factor": 1.0}}}, "sweep.lr.factor"),
    ({"sweep": {"batch_sizes": [8], "lr": {"values": [0.1, -0.1]}}}, "optimizer.lr"),
    ({"optimizer": {"name": "lamb", "lr": 0.1}}, "optimizer.name"),
    ({"goals": {"metric": "train_error", "thresholds": [0.1, 0.2]}}, "goals.thresholds"),
    ({"task": {"name": "imagenet"}}, "task.name"),
])
def test_bad_sweeps_name_the_field(change, field):
    with pytest.raises(SweepError, match=field.replace(".", r"\.")):
        expand(base_cfg(**change))


def test_default_launch_writes_records_and_relaunch_skips_them(tmp_path):
    sweep_dir = tmp_path / "sweep"
    done = launch(*SMALL, f"hydra.sweep.dir={sweep_dir}")
    assert done.returncode == 0, done.stderr
    assert f"python -m analysis.pareto {sweep_dir}" in done.stdout
    assert "4/4 runs" in done.stderr  # the progress bar reached the end
    frame = records.load_sweep(sweep_dir)
    assert sorted(frame["batch_size"].unique()) == [16, 64] and frame["run_id"].nunique() == 4
    assert frame.attrs["problems"] == []
    status = sweep_status(sweep_dir)
    assert sum(status["counts"].values()) == 4 and status["counts"]["pending"] == 0

    mtimes = {p: p.stat().st_mtime_ns for p in sweep_dir.rglob(records.RECORD_FILE)}
    again = launch(*SMALL, f"hydra.sweep.dir={sweep_dir}")
    assert again.returncode == 0, again.stderr
    assert "4 already complete, 0 to run" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in sweep_dir.rglob(records.RECORD_FILE)} == mtimes

    # A wider grid in the same directory runs only the new points.
    wider = launch(*[o for o in SMALL if not o.startswith("sweep.batch_sizes")], "sweep.batch_sizes=[16,64,256]",
                   f"hydra.sweep.dir={sweep_dir}")
    assert wider.returncode == 0, wider.stderr
    assert "4 already complete, 2 to run" in wider.stderr
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes


def test_submitit_local_launcher_runs_jobs_as_subprocesses(tmp_path):
    sweep_dir = tmp_path / "sweep"
    done = launch(*[o for o in SMALL if not o.startswith("launcher.")], "launcher=submitit_local",
                  f"hydra.sweep.dir={sweep_dir}")
    assert done.returncode == 0, done.stderr
    assert records.load_sweep(sweep_dir)["run_id"].nunique() == 4
    jobs = json.loads((sweep_dir / "jobs.json").read_text())
    assert jobs[0]["launcher"] == "submitit_local" and len(jobs[0]["job_ids"]) == 2  # one job per B
    pids = {json.loads(p.read_text())["summary"].get("pid") for p in sweep_dir.rglob(records.RECORD_FILE)}
    assert len(pids) == 2 and os.getpid() not in pids


def test_relaunch_reruns_failed_and_partial_runs(tmp_path):
    sweep_dir = tmp_path / "sweep"
    assert launch(*SMALL, f"hydra.sweep.dir={sweep_dir}").returncode == 0
    paths = sorted(sweep_dir.rglob(records.RECORD_FILE))
    partial, failed = paths[0], paths[1]
    for path, status in ((partial, records.RUNNING), (failed, records.FAILED)):
        record = json.loads(path.read_text())
        record["status"] = status
        records.write_record(path, record)
    counts = sweep_status(sweep_dir)["counts"]
    # The partial record's process (the finished launch) is gone: stale, not running.
    assert counts[records.FAILED] == 1 and counts["stale"] == 1 and counts[records.RUNNING] == 0
    record = json.loads(partial.read_text())
    record["summary"]["pid"] = os.getpid()  # a live process on this machine: still running
    records.write_record(partial, record)
    assert sweep_status(sweep_dir)["counts"][records.RUNNING] == 1
    with pytest.warns(UserWarning, match="partial record"):
        assert records.load_sweep(sweep_dir).attrs["problems"][0]["path"] == str(partial)
    again = launch(*SMALL, f"hydra.sweep.dir={sweep_dir}")
    assert again.returncode == 0, again.stderr
    assert "2 already complete, 2 to run" in again.stderr
    assert {json.loads(p.read_text())["status"] for p in (partial, failed)} <= set(records.FINISHED_STATUSES) - {records.FAILED}


@pytest.mark.parametrize("override, message", [
    ("optimizer.name=rmsprop", "optimizer.name='rmsprop' is not supported"),
    ("sweep.batch_sizes=[0,8]", "sweep.batch_sizes"),
    ("goals.metric=accuracy", "goals.metric='accuracy'"),
    ("launcher.group_by=node", "launcher.group_by"),
    ("packing.enabled=sometimes", "packing.enabled='sometimes'"),
    ("cuda_graphs=maybe", "cuda_graphs='maybe'"),
    pytest.param("cuda_graphs=true", "cuda_graphs=true, but this machine has no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
    pytest.param("device=cuda", "device=cuda, but this machine has no CUDA device",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
    ("sampling=epoch_shuffle", "exceeds task 'digits'"),  # B=4096 > 1797 examples without replacement
])
def test_bad_config_fails_fast_and_creates_nothing(tmp_path, override, message):
    sweep_dir = tmp_path / "sweep"
    extra = ["sweep.batch_sizes=[64,4096]"] if override.startswith("sampling") else []
    result = launch(*SMALL, *extra, override, f"hydra.sweep.dir={sweep_dir}", timeout=60)
    assert result.returncode == 2
    assert message in result.stderr and "nothing was submitted" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (sweep_dir / records.RUNS_DIR).exists() and not (sweep_dir / ".submitit").exists()


def test_status_command(tmp_path):
    sweep_dir = tmp_path / "sweep"
    assert launch(*SMALL, f"hydra.sweep.dir={sweep_dir}").returncode == 0
    next(sweep_dir.rglob(records.RECORD_FILE)).unlink()  # one run's record gone: it is pending again
    out = subprocess.run([sys.executable, "-m", "sweeps.status", str(sweep_dir)], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 0 and "1 pending" in out.stdout and "4 runs: 3 done" in out.stdout
    missing = subprocess.run([sys.executable, "-m", "sweeps.status", str(tmp_path / "nope")], cwd=REPO,
                             capture_output=True, text=True)
    assert missing.returncode == 2 and "not a sweep directory" in missing.stderr

