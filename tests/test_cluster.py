"""sweeps.cluster: cluster settings checked before anything is queued, and queued jobs watched
until they start or say why they cannot (issue #12, part 5). No cluster needed: sinfo and squeue
are stood in for; tests/test_slurm.py does the same against the real one."""
from __future__ import annotations

import subprocess

import pytest

from sweeps import cluster
from sweeps.grid import SweepError

SLURM = {"name": "slurm", "group_by": "batch_size", "threads": None, "wait": True, "partition": None,
         "account": None, "qos": None, "constraint": None, "timeout_min": 120, "cpus_per_task": 2,
         "gpus_per_node": 0, "mem_gb": 4, "array_parallelism": 64, "setup": [], "additional_parameters": {}}

# Two partitions: debug (default, two 8-CPU nodes with 23 GB, no time limit), gpu (one node with
# 4 GPUs, 64 CPUs, 256 GB, a 2-hour limit, drained).
SINFO = ("debug*|up|vm1|8|23081|idle|infinite|(null)\n"
         "debug*|up|vm2|8|23081|mixed|infinite|(null)\n"
         "gpu|up|g1|64|256000|drained|2:00:00|gpu:a100:4(S:0-1)\n")


def fake_run(outputs: dict):
    """A stand-in for subprocess.run: the first word of the command picks the (rc, stdout, stderr)."""
    calls = []

    def run(command, **kwargs):
        calls.append(command)
        rc, out, err = outputs[command[0]] if not callable(outputs[command[0]]) else outputs[command[0]](command)
        if rc is None:
            raise FileNotFoundError(command[0])
        return subprocess.CompletedProcess(command, rc, out, err)

    run.calls = calls
    return run


def slurm(**changes) -> dict:
    return {**SLURM, **changes}


@pytest.mark.parametrize("changes, field", [
    ({"timeout_min": 0}, "launcher.timeout_min"), ({"timeout_min": "60"}, "launcher.timeout_min"),
    ({"cpus_per_task": 0}, "launcher.cpus_per_task"), ({"cpus_per_task": True}, "launcher.cpus_per_task"),
    ({"mem_gb": -4}, "launcher.mem_gb"), ({"mem_gb": 2.5}, "launcher.mem_gb"),
    ({"array_parallelism": 0}, "launcher.array_parallelism"), ({"gpus_per_node": -1}, "launcher.gpus_per_node"),
    ({"threads": 0}, "launcher.threads"), ({"wait": "no"}, "launcher.wait"),
    ({"partition": "a b"}, "launcher.partition"), ({"account": "x\ny"}, "launcher.account"),
    ({"partition": 3}, "launcher.partition"), ({"setup": "module load cuda"}, "launcher.setup"),
    ({"job_name": "a\nb"}, "launcher.job_name"),
    ({"additional_parameters": ["mail-type"]}, "launcher.additional_parameters"),
    ({"additional_parameters": {"mail type": "END"}}, "launcher.additional_parameters.mail type"),
    ({"additional_parameters": {"mail-type\n": "END"}}, "launcher.additional_parameters"),
    ({"additional_parameters": {"mail-type=END": True}}, "launcher.additional_parameters"),
    ({"additional_parameters": {"-mail-type": "END"}}, "launcher.additional_parameters"),
    ({"additional_parameters": {"frobnicate": 1}}, "launcher.additional_parameters.frobnicate"),
    ({"additional_parameters": {"mail-type": "END\n#SBATCH --x=y"}}, "launcher.additional_parameters.mail-type"),
    ({"additional_parameters": {"mail-type": None}}, "launcher.additional_parameters.mail-type"),
    ({"additional_parameters": {"output": "/tmp/x"}}, "launcher.additional_parameters.output"),
    ({"additional_parameters": {"array": "0-3"}}, "launcher.additional_parameters.array"),
    ({"additional_parameters": {"cpus_per_task": 4}}, "launcher.cpus_per_task"),
    ({"additional_parameters": {"time": 10}}, "launcher.timeout_min"),
])
def test_bad_settings_name_the_field(changes, field):
    with pytest.raises(SweepError) as raised:
        cluster.check_settings(slurm(**changes))
    assert field in str(raised.value)


def test_good_settings_pass():
    cluster.check_settings(slurm(additional_parameters={"mail-type": "END", "mail_user": "me@x.org",
                                                         "requeue": True, "nice": 10, "exclusive": True}))
    cluster.check_settings({"name": "submitit_local", "group_by": "run", "threads": 2, "wait": False,
                            "timeout_min": 5, "cpus_per_task": 1})
    cluster.check_settings({"name": "local", "group_by": "run", "threads": None})


def test_known_sbatch_options_come_from_sbatch_when_it_answers():
    run = fake_run({"sbatch": (0, "  -p, --partition=partition   partition\n      --frobnicate   x\n", "")})
    assert {"partition", "frobnicate"} <= cluster.sbatch_options(run=run)
    assert "mail-type" in cluster.sbatch_options(run=fake_run({"sbatch": (None, "", "")}))  # the built-in list


def test_sinfo_is_parsed():
    nodes = cluster.parse_sinfo(SINFO)
    assert [(n.partition, n.default, n.cpus, n.memory_mb, n.time_limit_min, n.gpus) for n in nodes] == [
        ("debug", True, 8, 23081, None, 0), ("debug", True, 8, 23081, None, 0), ("gpu", False, 64, 256000, 120, 4)]
    assert cluster.parse_time_limit("1-02:03:00") == 24 * 60 + 2 * 60 + 3
    assert cluster.parse_time_limit("30:00") == 30 and cluster.parse_time_limit("UNLIMITED") is None


@pytest.mark.parametrize("changes, words", [
    ({"partition": "nope"}, ["launcher.partition='nope'", "debug", "gpu"]),
    ({"cpus_per_task": 16}, ["launcher.cpus_per_task=16", "8"]),
    ({"mem_gb": 100}, ["launcher.mem_gb=100", "22"]),
    ({"gpus_per_node": 1}, ["launcher.gpus_per_node=1", "debug"]),
    ({"partition": "gpu", "gpus_per_node": 8}, ["launcher.gpus_per_node=8", "4"]),
    ({"partition": "gpu", "timeout_min": 600}, ["launcher.timeout_min=600", "120"]),
])
def test_requests_the_cluster_cannot_meet_are_refused(changes, words):
    run = fake_run({"sinfo": (0, SINFO, "")})
    with pytest.raises(SweepError) as raised:
        cluster.check_cluster(slurm(**changes), run=run)
    for word in words:
        assert word in str(raised.value)


def test_requests_the_cluster_can_meet_pass_and_an_absent_sinfo_is_no_error():
    run = fake_run({"sinfo": (0, SINFO, "")})
    assert cluster.check_cluster(slurm(cpus_per_task=8, mem_gb=22), run=run) == []
    notes = cluster.check_cluster(slurm(partition="gpu", gpus_per_node=4, cpus_per_task=32, timeout_min=60), run=run)
    assert any("drained" in note for note in notes)  # it may run later: a note, not an error
    assert cluster.check_cluster(slurm(), run=fake_run({"sinfo": (None, "", "")})) is None
    assert cluster.check_cluster(slurm(), run=fake_run({"sinfo": (1, "", "slurm_load_partitions: error")})) is None


@pytest.mark.parametrize("reason, never", [
    ("Resources", False), ("Priority", False), ("ReqNodeNotAvail, UnavailableNodes:vm", False),
    ("BeginTime", False), ("JobHeldUser", False), ("PartitionDown", False), ("None", False),
    ("PartitionConfig", True), ("PartitionNodeLimit", True), ("PartitionTimeLimit", True),
    ("BadConstraints", True), ("InvalidQOS", True), ("InvalidAccount", True), ("DependencyNeverSatisfied", True),
    ("QOSMaxWallDurationPerJobLimit", True), ("AssocMaxCpuPerJobLimit", True),
])
def test_pending_reasons_that_can_never_run(reason, never):
    assert cluster.can_never_run(reason) is never
    assert cluster.explain(reason)


def test_watch_sees_jobs_start():
    states = iter(["7_[0-1]|PENDING|None\n", "7_0|RUNNING|None\n7_1|PENDING|Resources\n", "7_0|RUNNING|None\n7_1|RUNNING|None\n"])
    run = fake_run({"squeue": lambda command: (0, next(states), "")})
    watch = cluster.watch_start(["7_0", "7_1"], seconds=5, poll=0.01, run=run)
    assert watch.started and not watch.pending and not watch.never
    assert run.calls[0][:3] == ["squeue", "-h", "-j"] and "7" in run.calls[0][3].split(",")


def test_watch_reports_why_jobs_pend():
    run = fake_run({"squeue": (0, "7_0|RUNNING|None\n7_[1-3]|PENDING|Resources\n", "")})
    watch = cluster.watch_start(["7_0", "7_1", "7_2", "7_3"], seconds=0.05, poll=0.01, run=run)
    assert not watch.started and watch.pending == {"Resources": 3} and not watch.never
    assert "Resources" in watch.describe()


def test_watch_stops_at_once_on_a_job_that_can_never_run():
    run = fake_run({"squeue": (0, "7_[0-1]|PENDING|PartitionConfig\n", "")})
    watch = cluster.watch_start(["7_0", "7_1"], seconds=30, poll=0.01, run=run)
    assert watch.never == {"PartitionConfig": 2} and len(run.calls) == 1
    assert "PartitionConfig" in watch.describe() and "can never run" in watch.describe()


def test_jobs_gone_from_the_queue_have_started():
    run = fake_run({"squeue": (1, "", "slurm_load_jobs error: Invalid job id specified")})
    assert cluster.watch_start(["7_0"], seconds=5, poll=0.01, run=run).started
    assert cluster.watch_start(["7_0"], seconds=5, poll=0.01, run=fake_run({"squeue": (None, "", "")})).unknown
