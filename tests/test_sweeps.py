"""sweeps: grid expansion, validation before submission, local launch, relaunch, status."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from critbatch import records
from sweeps.grid import SweepError, centred_lr, expand, group_runs, lr_grid, lr_grid_note
from sweeps.status import sweep_status
from tests.helpers import REPO, SMALL, compose, launch, launch_here, wait_for


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


def test_each_optimizer_gets_its_own_lr_centre():
    lr = {"tuned_for": "sgd", "centre": {"eps_star": 3.0, "b_star": 200, "alpha": 1.0}, "factor": 2.0, "count": 3,
          "centres": {"adam": {"eps_star": 0.03, "b_star": 512, "alpha": 0.5}}}
    sgd = lr_grid(64, lr, {"name": "sgd"})
    assert sgd[1] == pytest.approx(centred_lr(64, 3.0, 200, 1.0), rel=1e-5)
    assert lr_grid_note(lr, {"name": "sgd"}) is None
    # momentum m has no centre here: the same effective step lr/(1 - m)
    for m in (0.9, 0.5):
        assert lr_grid(64, lr, {"name": "momentum", "momentum": m}) == pytest.approx([x * (1 - m) for x in sgd], rel=1e-5)
    level, note = lr_grid_note(lr, {"name": "momentum", "momentum": 0.9})
    assert level == "info" and "sweep.lr.tuned_for=momentum" in note
    # and back: a centre tuned for momentum serves SGD
    back = {**lr, "tuned_for": "momentum"}
    assert lr_grid(64, back, {"name": "sgd", "momentum": 0.9}) == pytest.approx([x * 10 for x in sgd], rel=1e-5)
    # adam: its own centre, else the tuned one as it is, with a warning
    assert lr_grid(64, lr, {"name": "adam"})[1] == pytest.approx(centred_lr(64, 0.03, 512, 0.5), rel=1e-5)
    level, note = lr_grid_note(lr, {"name": "adam"})
    assert level == "info" and "sweep.lr.centres.adam" in note and "sweep.lr.tuned_for=adam" in note
    alone = {**lr, "centres": None}
    assert lr_grid(64, alone, {"name": "adam"}) == sgd
    level, warning = lr_grid_note(alone, {"name": "adam"})
    assert level == "warning" and "tuned for sgd" in warning and "sweep.lr.tuned_for=adam" in warning
    # explicit values are taken as given; a grid that does not say what it was tuned for, too
    assert lr_grid(64, {**lr, "values": [0.1]}, {"name": "adam"}) == [0.1]
    assert lr_grid_note({**lr, "values": [0.1]}, {"name": "adam"}) is None
    assert lr_grid(64, {**lr, "tuned_for": None}, {"name": "adam"}) == sgd


def test_the_default_task_has_a_centre_for_each_optimizer_it_ships():
    grids = {name: expand(compose(f"optimizer={name}")) for name in ("sgd", "momentum", "adam")}
    lrs = {name: {r.config["batch_size"]: sorted({x.config["optimizer"]["lr"] for x in runs
                                                  if x.config["batch_size"] == r.config["batch_size"]})
                  for r in runs} for name, runs in grids.items()}
    for batch_size in (16, 1024):  # three different grids, none of them another optimizer's
        assert len({tuple(lrs[name][batch_size]) for name in lrs}) == 3
    assert max(lrs["momentum"][16]) < min(lrs["sgd"][16])      # momentum steps lr/(1 - 0.9) per unit gradient
    assert max(lrs["adam"][1024]) < min(lrs["momentum"][1024])


def test_a_grid_tuned_for_another_optimizer_is_warned_before_anything_runs(tmp_path, caplog):
    sweep_dir = tmp_path / "sweep"
    with caplog.at_level(logging.INFO):  # digits' grid was tuned for SGD and has no centre for Adam
        code = launch_here(sweep_dir, *SMALL, "optimizer=adam", "sweep.batch_sizes=[16]", "sweep.lr.count=1",
                           "budget.max_steps=3", "launcher.workers=1")
    assert code == 0
    said = [r.getMessage() for r in caplog.records]
    warned = next(i for i, m in enumerate(said) if m.startswith("warning: sweep.lr.centre was tuned for sgd"))
    started = next(i for i, m in enumerate(said) if "1 to run" in m)
    assert warned < started


@pytest.mark.slow
def test_momentum_on_the_default_task_trains_on_a_grid_of_its_own(tmp_path):
    """Before: momentum took SGD's grid and most runs diverged."""
    sweep_dir = tmp_path / "sweep"
    done = launch("optimizer=momentum", "sweep.batch_sizes=[16,1024]", "sweep.seeds=[0]", "goals.thresholds=[0.5,0.3]",
                  "launcher.threads=1", f"hydra.sweep.dir={sweep_dir}", timeout=600)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr
    frame = records.load_sweep(sweep_dir)
    statuses = frame.groupby("run_id")["status"].first()
    assert len(statuses) == 12 and (statuses == records.DIVERGED).sum() <= 1, statuses.value_counts()
    from critbatch.tradeoff import best_runs

    best = best_runs(frame)
    best = best[best["goal_threshold"] == 0.3]
    assert len(best) == 2 and best["reached"].all() and not best["lr_at_grid_edge"].any(), best


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
    assert f"{sys.executable} -m analysis.pareto {sweep_dir}" in done.stdout  # this interpreter, not `python`
    assert "4/4 runs" in done.stderr  # the progress bar reached the end
    log = (sweep_dir / "launch.log").read_text()  # Hydra's job log holds what the launch said
    assert "4 runs, 0 already complete, 4 to run" in log and "4/4 runs" in log and "4 runs: 4 done" in log
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


def test_relaunch_reruns_failed_partial_and_corrupt_runs(tmp_path):
    from sweeps import lease as leases

    sweep_dir = tmp_path / "sweep"
    assert launch(*SMALL, f"hydra.sweep.dir={sweep_dir}").returncode == 0
    paths = sorted(sweep_dir.rglob(records.RECORD_FILE))
    partial, failed, corrupt = paths[0], paths[1], paths[2]
    for path, status in ((partial, records.RUNNING), (failed, records.FAILED)):
        record = json.loads(path.read_text())
        record["status"] = status
        records.write_record(path, record)
    record = json.loads(corrupt.read_text())
    record["goals"] = "oops"  # a finished record that does not match its schema
    records.write_record(corrupt, record)
    counts = sweep_status(sweep_dir)["counts"]
    # The partial record has no live owner (no lease with a fresh heartbeat): stale, not running.
    assert counts[records.FAILED] == 1 and counts["stale"] == 1 and counts[records.RUNNING] == 0
    assert counts["unreadable"] == 1
    owner = leases.Lease.acquire(partial.parent)  # a live owner: still running
    assert sweep_status(sweep_dir)["counts"][records.RUNNING] == 1
    owner.release()
    with pytest.warns(UserWarning) as warned:
        problems = records.load_sweep(sweep_dir).attrs["problems"]
    assert sorted(p["path"] for p in problems) == sorted([str(partial), str(corrupt)])
    assert any("partial record" in str(w.message) for w in warned)
    assert any("goals: expected a list" in str(w.message) for w in warned)
    again = launch(*SMALL, f"hydra.sweep.dir={sweep_dir}")
    assert again.returncode == 0, again.stderr
    assert "1 already complete, 3 to run" in again.stderr
    assert {json.loads(p.read_text())["status"] for p in (partial, failed, corrupt)} <= \
        set(records.FINISHED_STATUSES) - {records.FAILED}


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
    ("seed=7", "sweep.seeds=[7]"),  # a Hydra override that sweep.seeds would silently override
    ("sweep.lr.values=[]", "sweep.lr.values"),
    ("goals.thresholds=[0.3,-0.1]", "goals.thresholds"),
])
def test_bad_config_fails_fast_and_creates_nothing(tmp_path, override, message):
    sweep_dir = tmp_path / "sweep"
    extra = ["sweep.batch_sizes=[64,4096]"] if override.startswith("sampling") else []
    result = launch(*SMALL, *extra, override, f"hydra.sweep.dir={sweep_dir}", timeout=60)
    assert result.returncode == 2
    assert message in result.stderr and "nothing was submitted" in result.stderr
    assert "Traceback" not in result.stderr
    assert not sweep_dir.exists()  # no folder, no .hydra, no launch.log


@pytest.mark.slow
def test_a_refused_launch_leaves_no_timestamped_folder(tmp_path):
    root, here = tmp_path / "sweeps_out", tmp_path / "here"
    here.mkdir()
    for refused in (["+sweep.batch_sizs=[8]"],                                             # a setting
                    ["task=mnist", "sweep=digits", f"paths.data_dir={tmp_path / 'no_data'}"]):  # missing data
        result = launch(*SMALL, *refused, f"paths.sweep_root={root}", timeout=120, cwd=here)
        assert result.returncode == 2 and "nothing was submitted" in result.stderr, result.stderr
        assert not root.exists(), sorted(root.rglob("*"))
        assert not any(here.iterdir())  # nor a log in the directory it was started from


@pytest.mark.slow
@pytest.mark.parametrize("workers, group_by", [(1, "all"), (2, "batch_size")])
def test_progress_moves_run_by_run_with_the_time_left(tmp_path, workers, group_by):
    """Before: the bar moved a job (all lrs of a batch size) at a time, without a time left."""
    sweep_dir = tmp_path / "sweep"
    # runs of a second or so each (the budget ends them, the goal 0.001 is out of reach), polled
    # ten times a second so that no two runs end between two polls
    result = launch(*SMALL, "goals.thresholds=[0.3,0.001]", "budget.max_steps=2500", f"launcher.workers={workers}",
                    "launcher.progress_seconds=0.1",
                    f"launcher.group_by={group_by}", f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode == 0, result.stderr
    counts = {int(n) for n in re.findall(r"\] (\d)/4 runs", result.stderr)}
    boundaries = {0, 4} if group_by == "all" else {0, 2, 4}
    assert counts - boundaries, result.stderr  # a count no job boundary gives
    assert 4 in counts and re.search(r"\d/4 runs \S+, about \S+ left", result.stderr), result.stderr


def test_the_progress_bar_says_how_long_is_left(caplog):
    from sweeps.launch import Progress

    with caplog.at_level(logging.INFO):
        progress = Progress(10, 2)  # 2 complete before: they say nothing about the rate
        time.sleep(0.2)
        progress.show(4)
    lines = [r.getMessage() for r in caplog.records]
    assert "2/10 runs" in lines[0] and "left" not in lines[0]
    left = re.search(r"4/10 runs \S+, about (\d+)s left", lines[-1])
    assert left and 0 < int(left.group(1)) <= 3  # 2 runs took 0.2 s: 6 more take about 0.6 s


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



# ---------------------------------------------------------------------------------------------
# in-process launches: every bad input is refused before anything is written or queued
# ---------------------------------------------------------------------------------------------

# (overrides, the field the message must name); none of these may write or queue anything
BAD_INPUTS = [
    # empty grids
    (["sweep.lr.values=[]"], "sweep.lr.values"),
    (["sweep.lr.values={16:[0.1],64:[]}"], "sweep.lr.values"),
    (["sweep.seeds=[]"], "sweep.seeds"),
    (["sweep.seeds=[0.5]"], "sweep.seeds"),
    (["sweep.batch_sizes=[]"], "sweep.batch_sizes"),
    (["sweep.lr.count=0"], "sweep.lr.count"),
    # goals that can never be met, or are met before training starts
    (["goals.thresholds=[0.3,-0.1]"], "goals.thresholds"),
    (["goals.thresholds=[1.5,0.2]"], "goals.thresholds"),
    (["goals.thresholds=[1.0,0.2]"], "goals.thresholds"),
    (["goals.thresholds=[0.3,0.0]"], "goals.thresholds"),
    (["goals.metric=clean_train_error", "goals.thresholds=[2.0]"], "goals.thresholds"),
    (["goals.metric=train_loss", "goals.thresholds=[0.5,0.0]"], "goals.thresholds"),
    (["goals.metric=train_loss", "goals.thresholds=[-1.0]"], "goals.thresholds"),
    (["task=linreg", "sweep=linreg", "goals.thresholds=[1.0,-0.3]"], "goals.thresholds"),
    # settings that another key overrides
    (["seed=7"], "sweep.seeds=[7]"),
    (["optimizer.lr=0.5"], "sweep.lr"),
    (["+batch_size=64"], "sweep.batch_sizes"),
    # launcher settings (checked whether or not a cluster answers)
    (["launcher=slurm", "launcher.timeout_min=0"], "launcher.timeout_min"),
    (["launcher=slurm", "launcher.timeout_min=1.5"], "launcher.timeout_min"),
    (["launcher=slurm", "launcher.cpus_per_task=-1"], "launcher.cpus_per_task"),
    (["launcher=slurm", "launcher.mem_gb=0"], "launcher.mem_gb"),
    (["launcher=slurm", "launcher.array_parallelism=0"], "launcher.array_parallelism"),
    (["launcher=slurm", "launcher.gpus_per_node=-1"], "launcher.gpus_per_node"),
    (["launcher=slurm", "launcher.wait=sometimes"], "launcher.wait"),
    (["launcher=slurm", "launcher.partition='a b'"], "launcher.partition"),
    (["launcher=slurm", "+launcher.additional_parameters.comment=NEWLINE"], "launcher.additional_parameters.comment"),
    (["launcher=slurm", "+launcher.additional_parameters.frobnicate=1"], "launcher.additional_parameters"),
    (["launcher=slurm", "+launcher.additional_parameters.output=/tmp/x"], "launcher.additional_parameters"),
    (["launcher=slurm", "+launcher.additional_parameters.time=10"], "launcher.additional_parameters"),
    (["launcher=submitit_local", "launcher.cpus_per_task=0"], "launcher.cpus_per_task"),
    (["launcher.threads=0"], "launcher.threads"),
]


@pytest.mark.parametrize("overrides, field", BAD_INPUTS, ids=[" ".join(o) for o, _ in BAD_INPUTS])
def test_bad_inputs_are_refused_before_anything_is_written(tmp_path, monkeypatch, overrides, field):
    from critbatch.config import ConfigError
    from sweeps import launch as launch_module

    def never(*args, **kwargs):
        raise AssertionError("a bad input got as far as running or queueing jobs")

    monkeypatch.setattr(launch_module, "launch_local", never)
    monkeypatch.setattr(launch_module, "launch_submitit", never)
    sweep_dir = tmp_path / "sweep"
    with pytest.raises(ConfigError) as raised:
        launch_here(sweep_dir, *SMALL, *overrides)
    assert field in str(raised.value)
    assert not sweep_dir.exists()


def test_good_inputs_next_to_the_bad_ones_are_accepted():
    """The checks refuse what is wrong, not what is unusual."""
    from sweeps.grid import check_overrides

    for overrides in (["seed=7", "sweep.seeds=[7]"], ["sweep.seeds=[3,4]"], ["goals.thresholds=[0.9,0.001]"],
                      ["goals.metric=train_loss", "goals.thresholds=[2.0,1e-4]"],
                      ["task=linreg", "sweep=linreg", "goals.metric=exact_loss", "goals.thresholds=[2.0,0.6]"]):
        cfg = compose(*SMALL, *overrides)
        runs = expand(cfg)
        check_overrides(cfg, overrides)
        assert runs


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_sweep_directory_holds_one_sweep_definition(tmp_path):
    sweep_dir = tmp_path / "sweep"
    assert launch(*SMALL, f"hydra.sweep.dir={sweep_dir}").returncode == 0
    manifest = (sweep_dir / "sweep.json").read_bytes()
    assert json.loads(manifest)["variant"] == records.sweep_variant(expand(compose(*SMALL))[0].config)
    runs = sorted(p.name for p in (sweep_dir / records.RUNS_DIR).iterdir())
    assert "max_steps: 400" in (sweep_dir / ".hydra" / "config.yaml").read_text()
    before = snapshot(sweep_dir)
    shorter = [o for o in SMALL if not o.startswith("budget.")] + ["budget.max_steps=300"]
    refused = launch(*shorter, f"hydra.sweep.dir={sweep_dir}")
    assert refused.returncode == 2 and "nothing was submitted" in refused.stderr
    for words in ("budget.max_steps", "400", "300", "hydra.sweep.dir", "sweep.allow_new_variant=true"):
        assert words in refused.stderr
    # not a byte changed: sweep.json, .hydra/ (its config is still the one the runs used), launch.log
    assert snapshot(sweep_dir) == before
    assert (sweep_dir / "sweep.json").read_bytes() == manifest
    assert sorted(p.name for p in (sweep_dir / records.RUNS_DIR).iterdir()) == runs
    with pytest.raises(SweepError, match="task.hidden"):  # any identity-defining setting
        launch_here(sweep_dir, *SMALL, "task.hidden=64")
    assert snapshot(sweep_dir) == before
    # Asked for explicitly, the directory takes the new variant; it never counts both.
    allowed = launch(*shorter, "sweep.allow_new_variant=true", f"hydra.sweep.dir={sweep_dir}")
    assert allowed.returncode == 0, allowed.stderr
    assert "4 already complete, 4 to run" not in allowed.stderr and "0 already complete, 4 to run" in allowed.stderr
    assert "max_steps: 300" in (sweep_dir / ".hydra" / "config.yaml").read_text()  # the launch that ran
    assert sum(sweep_status(sweep_dir)["counts"].values()) == 4
    with pytest.warns(UserWarning, match="variant"):
        frame = records.load_sweep(sweep_dir)
    assert frame["run_id"].nunique() == 4 and len(frame.attrs["problems"]) == 4
    assert set(frame["run_id"]) == {r.run_id for r in expand(compose(*shorter))}


# ---------------------------------------------------------------------------------------------
# a full disk
# ---------------------------------------------------------------------------------------------

def test_a_write_error_is_a_failed_run_in_every_summary(tmp_path, monkeypatch):
    """The record's write fails mid-run (disk full): the run is failed in run_group's summary, in
    the lease the job leaves and so in sweeps.status, never 'running'."""
    import errno

    from sweeps import lease as leases
    from sweeps.jobs import run_group
    from sweeps.launch import write_manifest

    runs = expand(compose(*SMALL, "sweep.batch_sizes=[16]"))
    write_manifest(tmp_path, runs, {})
    real_write, writes = records.write_record, []

    def failing_write(path, record):
        writes.append(path)
        if len(writes) > 1:  # the first run's first record is written, nothing after it
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, record)

    monkeypatch.setattr(records, "write_record", failing_write)
    summaries = run_group(str(tmp_path), [run.config for run in runs])
    assert [s["status"] for s in summaries] == [records.FAILED, records.FAILED]
    assert all("No space left" in s["error"] for s in summaries)
    status = sweep_status(tmp_path)
    assert status["counts"][records.FAILED] == 2 and status["counts"][records.RUNNING] == 0
    assert all(leases.read_lease(records.run_dir(tmp_path, run.config)).state == "failed" for run in runs
               if (records.run_dir(tmp_path, run.config) / leases.LEASE_FILE).exists())


def test_a_full_disk_mid_run(tmp_path):
    """A real full disk (a small tmpfs): the records stay intact, the runs are failed in the
    launch's summary and in sweeps.status, and the launch fails."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root); the mocked write error above covers the logic")
    try:
        sweep_dir = disk / "sweep"
        slow = ["sweep.batch_sizes=[16]", "sweep.lr.count=2", "sweep.seeds=[0]", "goals.thresholds=[0.01]",
                "budget.max_steps=5000",
                "log.checkpoint_seconds=0.1", "launcher.threads=1"]
        job = subprocess.Popen([sys.executable, "-m", "sweeps.launch", *slow, f"hydra.sweep.dir={sweep_dir}"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 60
        while not any(json.loads(p.read_text() or "{}").get("summary", {}).get("steps", 0) > 0
                      for p in sweep_dir.rglob(records.RECORD_FILE)):
            assert time.time() < deadline and job.poll() is None, job.stderr.read() if job.poll() is not None else ""
            time.sleep(0.05)
        with open(disk / "filler", "wb", buffering=0) as filler:  # fill the disk (unbuffered: nothing to flush)
            try:
                while True:
                    filler.write(b"\0" * 65536)
            except OSError:
                pass
        out, err = job.communicate(timeout=120)
        assert job.returncode == 1, err
        assert "No space left on device" in err, err
        assert "0 running" in out and "2 failed" in out
        status = sweep_status(sweep_dir)
        assert status["counts"][records.RUNNING] == 0
        for path in sweep_dir.rglob(records.RECORD_FILE):
            # intact: the last good version, or, where a half-written checkpoint was removed and so
            # made room, the record of the failure, naming the disk
            record = records.read_record(path)
            assert not records.is_complete(path)
            assert record["status"] == records.RUNNING or (
                record["status"] == records.FAILED and "No space left on device" in record["summary"]["error"])
    finally:
        subprocess.run(["umount", "-l", str(disk)])


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_stops_with_one_line_and_a_relaunch_resumes(tmp_path, workers):
    """Ctrl-C (SIGINT to the terminal's whole process group) ends the launch with one line that says
    how to resume, no traceback; the runs it stopped are `interrupted` with their state saved, and
    the relaunch it names resumes them to the end."""
    import signal

    sweep_dir = tmp_path / "sweep"
    slow = ["task=digits", "sweep.batch_sizes=[16,32]", "sweep.lr.values=[0.05]", "sweep.seeds=[0]",
            "goals.metric=train_loss", "goals.thresholds=[1e-9]", "divergence.stall_steps=0",
            "budget.max_steps=5000", "log.checkpoint_seconds=0.5", "launcher.threads=1", f"launcher.workers={workers}",
            "launcher.group_by=run",
            f"hydra.sweep.dir={sweep_dir}"]
    process = subprocess.Popen([sys.executable, "-m", "sweeps.launch", *slow], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: any(records.read_record(p)["summary"]["steps"] > 0 for p in sweep_dir.rglob(records.RECORD_FILE)),
             120, "training to start")
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted:") and "resume with:" in last and f"hydra.sweep.dir={sweep_dir}" in last, err
    stopped = [p for p in sweep_dir.rglob(records.RECORD_FILE)
               if records.read_record(p)["status"] == records.INTERRUPTED]
    assert stopped and all((p.parent / "checkpoint.pt").exists() for p in stopped)
    assert sweep_status(sweep_dir)["counts"][records.INTERRUPTED] == len(stopped)
    steps = {p: records.read_record(p)["summary"]["steps"] for p in stopped}
    resumed = launch(*slow, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    for path, at in steps.items():
        record = records.read_record(path)
        resumed_at = record["summary"]["resumed_at"]
        assert record["status"] == records.BUDGET_EXHAUSTED and len(resumed_at) == 1 and resumed_at[0] >= at
    assert max(steps.values()) > 0  # (a run stopped while it set up resumes from step 0)
