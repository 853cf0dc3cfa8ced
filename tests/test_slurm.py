"""sweeps.launch against a real SLURM cluster (scripts/slurm/start_local_slurm.sh starts one).

In CI (CI=true) a missing cluster is an error, not a skip: these tests are the proof that the
SLURM path works.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from critbatch import records
from critbatch.train import CHECKPOINT_FILE
from sweeps.status import sweep_status
from sweeps import lease as leases
from tests.helpers import REPO, SMALL, assert_close, comparable, launch, launch_here, wait_for

pytestmark = pytest.mark.slurm


def cluster_up() -> bool:
    if shutil.which("sbatch") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


@pytest.fixture(scope="module", autouse=True)
def slurm():
    if not cluster_up():
        if os.environ.get("CI"):
            pytest.fail("no SLURM cluster: run scripts/slurm/start_local_slurm.sh first")
        pytest.skip("no SLURM cluster (start one with scripts/slurm/start_local_slurm.sh)")


SLURM = ["launcher=slurm", "launcher.cpus_per_task=1", "launcher.mem_gb=1", "launcher.timeout_min=10"]


def sacct_job_count() -> int:
    out = subprocess.run(["sacct", "-a", "-X", "-n", "-P", "-o", "JobID", "-S", "now-1days"],
                         capture_output=True, text=True, check=True).stdout
    return len(out.split())


def test_slurm_sweep_completes_and_records_load(tmp_path):
    sweep_dir = tmp_path / "sweep"
    started = time.time()
    result = launch(*SMALL, *SLURM, f"hydra.sweep.dir={sweep_dir}", timeout=600)
    assert result.returncode == 0, result.stderr
    frame = records.load_sweep(sweep_dir)
    assert frame["run_id"].nunique() == 4 and frame.attrs["problems"] == []
    assert set(frame["status"]) <= {records.COMPLETED, records.DIVERGED, records.BUDGET_EXHAUSTED}
    # The runs really ran as SLURM array tasks: one job per batch size (group_by=batch_size).
    jobs = json.loads((sweep_dir / "jobs.json").read_text())
    assert len(jobs) == 1 and len(jobs[0]["job_ids"]) == 2 and all("_" in j for j in jobs[0]["job_ids"])
    hosts = {json.loads(p.read_text())["summary"]["host"] for p in sweep_dir.rglob(records.RECORD_FILE)}
    assert len(hosts) == 1
    print(f"slurm sweep of 4 runs took {time.time() - started:.1f} s")


def goal_steps(sweep_dir) -> dict[str, list]:
    """Each run's (goal, reached, step) and its total steps, by run directory."""
    out = {}
    for path in sweep_dir.rglob(records.RECORD_FILE):
        record = records.read_record(path)
        out[path.parent.name] = ([(g["threshold"], g["reached"], g["step"]) for g in record["goals"]],
                                 record["summary"]["steps"], record["status"])
    return out


@pytest.mark.slow
def test_an_mnist1d_sweep_on_slurm_matches_the_same_sweep_run_here(tmp_path):
    # the default task on real (generated) data, as a job array, against the same grid run locally
    grid = ["task=mnist1d", "sweep.batch_sizes=[32,128]", "sweep.lr.count=2", "sweep.seeds=[0]",
            "goals.thresholds=[0.8,0.7,0.6]", "budget.max_steps=400", "launcher.threads=1"]
    on_slurm = launch(*grid, *SLURM, f"hydra.sweep.dir={tmp_path / 'slurm'}", timeout=600)
    assert on_slurm.returncode == 0, on_slurm.stderr
    here = launch(*grid, "launcher.workers=1", f"hydra.sweep.dir={tmp_path / 'here'}", timeout=600)
    assert here.returncode == 0, here.stderr
    jobs = json.loads((tmp_path / "slurm" / "jobs.json").read_text())
    assert len(jobs[0]["job_ids"]) == 2 and all("_" in j for j in jobs[0]["job_ids"])  # an array, one task per B
    slurm_steps, local_steps = goal_steps(tmp_path / "slurm"), goal_steps(tmp_path / "here")
    assert len(slurm_steps) == 4 and slurm_steps == local_steps
    assert any(reached for goals, _, _ in slurm_steps.values() for _, reached, _ in goals)  # not vacuous


@pytest.mark.slow
def test_cancelled_job_checkpoints_its_run_and_a_relaunch_resumes_it(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # One slow run (B=8, an unreachable goal, 30k steps) that we cancel while it trains.
    slow = ["sweep.batch_sizes=[8]", "sweep.lr.count=1", "sweep.seeds=[0]", "goals.metric=train_loss",
            "goals.thresholds=[1e-9]", "divergence.stall_steps=0",
            "budget.max_steps=30000", "log.checkpoint_seconds=0.2", "launcher.threads=1", "launcher.wait=false"]
    submitted = launch(*slow, *SLURM, f"hydra.sweep.dir={sweep_dir}", timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    assert "sweeps.status" in submitted.stdout
    assert "started" in submitted.stderr  # the launch saw its job start (or said why it pends)
    job_id = json.loads((sweep_dir / "jobs.json").read_text())[0]["job_ids"][0]

    record_path = wait_for(lambda: next(sweep_dir.rglob(records.RECORD_FILE), None), 120, "the run's first record")
    wait_for(lambda: records.read_record(record_path)["summary"]["steps"] > 0, 120, "training to start")
    subprocess.run(["scancel", job_id], check=True)
    checkpoint = record_path.parent / CHECKPOINT_FILE
    wait_for(lambda: sweep_status(sweep_dir)["counts"][records.INTERRUPTED] == 1, 60, "the cancelled run to be reported")
    assert checkpoint.exists()  # SIGTERM: the run's state was saved at the next step boundary
    stopped_at = records.read_record(record_path)["summary"]["steps"]
    assert records.read_record(record_path)["status"] == records.INTERRUPTED  # partial: not analysed
    assert records.load_sweep(sweep_dir).empty

    rerun = launch(*[o for o in slow if o != "launcher.wait=false"], *SLURM, f"hydra.sweep.dir={sweep_dir}",
                   timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "0 already complete, 1 to run" in rerun.stderr
    record = records.read_record(record_path)
    assert record["status"] == records.BUDGET_EXHAUSTED and not checkpoint.exists()
    assert len(record["summary"]["resumed_at"]) == 1 and record["summary"]["resumed_at"][0] >= stopped_at > 0


@pytest.mark.slow
def test_the_signal_before_a_time_limit_checkpoints_requeues_and_resumes(tmp_path):
    """SLURM warns a job signal_delay_s before its time limit with SIGUSR2 (submitit asks for it
    with --signal=USR2@...): the run being trained is checkpointed, the job requeues itself and the
    requeued job resumes the run to its end. The test sends that signal with scancel rather than
    waiting out a time limit (SLURM's shortest is a minute, and it may signal up to a minute early)."""
    sweep_dir = tmp_path / "sweep"
    overrides = ["sweep.batch_sizes=[8]", "sweep.lr.values=[0.05]", "sweep.seeds=[0]",
                 "goals.metric=train_loss", "goals.thresholds=[1e-9]", "divergence.stall_steps=0",
                 "budget.max_steps=40000", "launcher.threads=1", "launcher.signal_delay_s=30",
                 "launcher.max_requeues=3", "log.checkpoint_seconds=1000", "launcher.wait=false"]
    submitted = launch(*overrides, *SLURM, f"hydra.sweep.dir={sweep_dir}", timeout=120)
    assert submitted.returncode == 0, submitted.stderr
    job_id = json.loads((sweep_dir / "jobs.json").read_text())[0]["job_ids"][0]
    script = next(sweep_dir.rglob("*_submission.sh")).read_text()
    assert "--signal=USR2@30" in script, script  # SLURM itself will send it before the limit

    # the record is rewritten only at checkpoints (none before the signal here): the lease's log
    # says when training started
    lease_log = wait_for(lambda: next(sweep_dir.rglob("lease.log"), None), 120, "the run's lease")
    wait_for(lambda: '"train"' in lease_log.read_text(), 120, "training to start")
    time.sleep(5)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    # SLURM holds a requeued job for a while (reason BeginTime); let it start at once
    wait_for(lambda: "BeginTime" in subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%r"], capture_output=True,
                                                   text=True).stdout, 120, "the job to be requeued")
    # slurmd refuses a job whose credential is no newer than its revocation at the requeue (whole
    # seconds): started within the same second it fails with "Job credential revoked"
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
    record_path = lease_log.parent / records.RECORD_FILE

    def run_finished() -> bool:
        if records.Status(records.read_record(record_path)["status"]).finished:
            return True
        state = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id], capture_output=True,
                               text=True).stdout.split()
        assert not state or state[-1] not in ("FAILED", "NODE_FAIL"), f"the requeued job {job_id} ended {state[-1]}"
        return False

    wait_for(run_finished, 400, "the requeued run to finish")

    record = records.read_record(record_path)
    assert record["status"] == records.BUDGET_EXHAUSTED and record["summary"]["steps"] == 40000
    resumed = record["summary"].get("resumed_at", [])
    assert len(resumed) == 1 and 0 < resumed[0] < 40000, "the run was not interrupted and resumed"
    assert not list(sweep_dir.rglob(CHECKPOINT_FILE))
    history = subprocess.run(["sacct", "-n", "-X", "-P", "-D", "-o", "JobID,State", "-j", job_id],
                             capture_output=True, text=True).stdout
    assert "REQUEUED" in history or "PREEMPTED" in history or len(history.splitlines()) > 1, history


def test_bad_config_submits_nothing(tmp_path):
    before = sacct_job_count()
    result = launch(*SMALL, *SLURM, "sweep.lr.values=[0.1,-1.0]", f"hydra.sweep.dir={tmp_path / 'sweep'}", timeout=60)
    assert result.returncode == 2 and "optimizer.lr=-1.0 must be a number > 0" in result.stderr
    assert "nothing was submitted" in result.stderr
    assert not (tmp_path / "sweep" / ".submitit").exists()
    assert sacct_job_count() == before


@pytest.mark.slow
def test_three_concurrent_slurm_launches_train_each_run_once(tmp_path):
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "-m", "sweeps.launch", *SMALL, *SLURM, f"hydra.sweep.dir={sweep_dir}"]
    launches = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(3)]
    outputs = [launch.communicate(timeout=600) for launch in launches]
    assert [launch.returncode for launch in launches] == [0, 0, 0], [err for _, err in outputs]
    jobs = json.loads((sweep_dir / "jobs.json").read_text())
    assert 1 <= len(jobs) <= 3  # no entry lost to a concurrent writer of jobs.json
    history = {run.name: leases.history(run) for run in (sweep_dir / records.RUNS_DIR).iterdir()}
    assert len(history) == 4
    assert all(sum(e["event"] == "train" for e in events) == 1 for events in history.values()), history
    # the owners were SLURM array tasks of these launches
    tasks = {task for entry in jobs for task in entry["job_ids"]}
    assert {e["owner"] for events in history.values() for e in events if e["event"] == "train"} <= tasks
    frame = records.load_sweep(sweep_dir)
    assert frame["run_id"].nunique() == 4 and frame.attrs["problems"] == []
    assert list(sweep_dir.rglob(leases.LEASE_FILE)) == []


@pytest.mark.parametrize("overrides, words", [
    (["launcher.partition=nope"], ["launcher.partition='nope'", "debug"]),
    (["launcher.cpus_per_task=64"], ["launcher.cpus_per_task=64"]),
    (["launcher.mem_gb=1000"], ["launcher.mem_gb=1000"]),
    (["launcher.gpus_per_node=1"], ["launcher.gpus_per_node=1"]),
    (["+launcher.additional_parameters.frobnicate=1"], ["launcher.additional_parameters.frobnicate"]),
    (["launcher.tasks_per_node=16", "noise_scale.micro_batches=16"],          # one run on 16 ranks
     ["launcher.tasks_per_node=16", "needs 16 CPUs"]),
    (["launcher.tasks_per_node=2", "launcher.nodes=2"], ["launcher.nodes=2", "has 1 node(s)"]),
])
def test_cluster_settings_are_checked_before_anything_is_queued(tmp_path, overrides, words):
    from critbatch.config import ConfigError

    before = sacct_job_count()
    with pytest.raises(ConfigError) as raised:
        launch_here(tmp_path / "sweep", *SMALL, *SLURM, *overrides)
    for word in words:
        assert word in str(raised.value)
    assert not (tmp_path / "sweep").exists()
    assert sacct_job_count() == before


def test_jobs_that_can_never_run_are_cancelled_and_the_launch_fails(tmp_path):
    """Two nodes asked of a one-node partition: sbatch queues it, SLURM never starts it
    (PartitionConfig or PartitionNodeLimit). The launch says so, cancels the array and exits
    non-zero, without waiting (launcher.wait=false) as with it."""
    sweep_dir = tmp_path / "sweep"
    result = launch(*SMALL, *SLURM, "launcher.wait=false", "+launcher.additional_parameters.nodes=2",
                    f"hydra.sweep.dir={sweep_dir}", timeout=120)
    assert result.returncode == 1, result.stderr
    reason = "PartitionConfig" if "PartitionConfig" in result.stderr else "PartitionNodeLimit"
    assert reason in result.stderr and "cancelled" in result.stderr and "can never run" in result.stderr
    entry = json.loads((sweep_dir / "jobs.json").read_text())[-1]
    assert reason in entry["cancelled"]
    array = entry["job_ids"][0].split("_")[0]
    queued = subprocess.run(["squeue", "-h", "-j", array], capture_output=True, text=True).stdout
    assert queued.strip() == ""


@pytest.mark.slow
def test_a_run_on_a_two_task_slurm_job_records_what_one_process_records(tmp_path):
    """One run as a job of 2 SLURM tasks (2 ranks, gloo; submitit's TorchDistributedEnvironment),
    against the same run trained by one process here: the records agree within float rounding."""
    run = ["task=digits", "task.hidden=32", "optimizer=adam", "sweep.batch_sizes=[32]", "sweep.lr.values=[0.003]",
           "sweep.seeds=[0]", "goals.thresholds=[0.5,0.2]", "budget.max_steps=100", "launcher.threads=1"]
    on_slurm = launch(*run, *SLURM, "launcher.mem_gb=2", "launcher.tasks_per_node=2",
                      "launcher.rank_timeout_s=120", f"hydra.sweep.dir={tmp_path / 'slurm'}", timeout=600)
    assert on_slurm.returncode == 0, on_slurm.stderr
    here = launch(*run, "launcher.workers=1", f"hydra.sweep.dir={tmp_path / 'here'}", timeout=600)
    assert here.returncode == 0, here.stderr
    script = next((tmp_path / "slurm").rglob("*_submission.sh")).read_text()
    assert "--ntasks-per-node=2" in script and "--kill-on-bad-exit=1" in script, script
    (ranks_path,), (alone_path,) = (list((tmp_path / d).rglob(records.RECORD_FILE)) for d in ("slurm", "here"))
    on_ranks, alone = records.read_record(ranks_path), records.read_record(alone_path)
    assert on_ranks["summary"]["processes"] == 2 and alone["summary"]["processes"] == 1
    assert on_ranks["status"] == alone["status"] == records.COMPLETED
    worst = assert_close(comparable(on_ranks), comparable(alone), 1e-3)
    print(f"2-task SLURM job against one process: largest relative difference {worst[0]:.2e} ({worst[1]})")
    # one owner per run: rank 0, the array task
    trained = [e for e in leases.history(ranks_path.parent) if e["event"] == "train"]
    jobs = json.loads((tmp_path / "slurm" / "jobs.json").read_text())
    assert len(trained) == 1 and trained[0]["ranks"] == 2 and trained[0]["owner"] in jobs[0]["job_ids"]
