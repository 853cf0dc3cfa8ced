"""Cluster settings checked before anything is written or queued, and queued jobs watched until
they start or say why they cannot.

    check_settings(launcher)   types and ranges of the launcher.* settings, the sbatch option names
                               and values of launcher.additional_parameters (no cluster needed)
    check_cluster(launcher)    partition, CPUs, memory, GPUs and time limit against what `sinfo`
                               reports (only when sinfo answers)
    watch_start(job_ids)       after submitting: poll `squeue` until the jobs start, for at most
                               WATCH_SECONDS; report why they pend, and stop at once on a reason
                               that means they can never run (the launch then cancels them)

sweeps/launch.py calls the first two before sweep.json is written and the third right after
submitting, whether or not the launch waits for the jobs.
"""
from __future__ import annotations

import re
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field

from sweeps.grid import SweepError

# Settings that must be integers > 0 (>= 0 for gpus_per_node), per launcher.
POSITIVE_INTS = {"slurm": ("timeout_min", "cpus_per_task", "mem_gb", "array_parallelism"),
                 "submitit_local": ("timeout_min", "cpus_per_task")}
# Plain sbatch words: a partition, account, qos or job name has no whitespace.
WORD_SETTINGS = ("partition", "account", "qos", "job_name")
WATCH_SECONDS = 20.0
OPTION_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*\Z")

# sbatch's long options (Slurm 22-24), for when `sbatch --help` cannot be asked.
KNOWN_SBATCH_OPTIONS = frozenset("""
account acctg-freq array batch bb bbf begin chdir cluster-constraint clusters comment constraint
container container-id contiguous core-spec cores-per-socket cpu-freq cpus-per-gpu cpus-per-task
deadline delay-boot dependency distribution error exclude exclusive export export-file extra
extra-node-info get-user-env gid gpu-bind gpu-freq gpus gpus-per-node gpus-per-socket gpus-per-task
gres gres-flags hint hold ignore-pbs input job-name kill-on-invalid-dep licenses mail-type mail-user
mcs-label mem mem-bind mem-per-cpu mem-per-gpu mincpus network nice no-kill no-requeue nodefile
nodelist nodes ntasks ntasks-per-core ntasks-per-gpu ntasks-per-node ntasks-per-socket open-mode
output overcommit oversubscribe parsable partition power prefer priority profile propagate qos quiet
reboot requeue reservation signal sockets-per-node spread-job switches test-only thread-spec
threads-per-core time time-min tmp tres-per-task uid use-min-nodes verbose wait wait-all-nodes
wckey wrap
""".split())
# Options that submitit writes itself, or that a launcher setting owns.
MANAGED_OPTIONS = {"array": None, "output": None, "error": None, "open-mode": None, "wrap": None,
                   "parsable": None, "wait": None, "test-only": None,
                   "time": "timeout_min", "cpus-per-task": "cpus_per_task", "mem": "mem_gb",
                   "partition": "partition", "account": "account", "qos": "qos", "constraint": "constraint",
                   "job-name": "job_name", "gpus-per-node": "gpus_per_node"}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def sbatch_options(run=subprocess.run) -> frozenset[str]:
    """sbatch's long option names: from `sbatch --help` when it answers, else the built-in list."""
    try:
        out = run(["sbatch", "--help"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return KNOWN_SBATCH_OPTIONS
    found = set(re.findall(r"--([a-z][a-z0-9-]*)", out.stdout or ""))
    return frozenset(found) if out.returncode == 0 and len(found) > 10 else KNOWN_SBATCH_OPTIONS | found


def check_settings(launcher: dict, run=subprocess.run) -> None:
    """Types, ranges and option names of the launcher.* settings; raises SweepError naming the field."""
    name = launcher.get("name")
    threads = launcher.get("threads")
    if threads is not None and not (_is_int(threads) and threads > 0):
        raise SweepError(f"launcher.threads={threads!r} must be an integer > 0, or null for the default")
    if name == "local":
        return
    if not isinstance(launcher.get("wait", True), bool):
        raise SweepError(f"launcher.wait={launcher.get('wait')!r} must be true or false")
    for key in POSITIVE_INTS.get(name, ()):
        value = launcher.get(key)
        if not (_is_int(value) and value > 0):
            raise SweepError(f"launcher.{key}={value!r} must be an integer > 0")
    if name != "slurm":
        return
    for key in ("gpus_per_node", "signal_delay_s", "max_requeues"):
        value = launcher.get(key) or 0
        if not (_is_int(value) and value >= 0):
            raise SweepError(f"launcher.{key}={value!r} must be an integer >= 0")
    for key in WORD_SETTINGS:
        value = launcher.get(key)
        if value is not None and not (isinstance(value, str) and value and not re.search(r"\s", value)):
            raise SweepError(f"launcher.{key}={value!r} must be a name without spaces or newlines, or null")
    constraint = launcher.get("constraint")
    if constraint is not None and not (isinstance(constraint, str) and constraint and "\n" not in constraint):
        raise SweepError(f"launcher.constraint={constraint!r} must be a feature expression without newlines, or null")
    setup = launcher.get("setup") or []
    if not isinstance(setup, list) or not all(isinstance(line, str) for line in setup):
        raise SweepError(f"launcher.setup={setup!r} must be a list of shell lines")
    extra = launcher.get("additional_parameters") or {}
    if not isinstance(extra, dict):
        raise SweepError(f"launcher.additional_parameters={extra!r} must be a mapping of sbatch option -> value")
    known = sbatch_options(run) if extra else frozenset()
    for key, value in extra.items():
        field = f"launcher.additional_parameters.{key}"
        if not isinstance(key, str) or not OPTION_NAME.match(key):
            raise SweepError(f"{field}: {key!r} is not an sbatch option name (letters, digits, '-' or '_', "
                             "starting with a letter; no '=', spaces or newlines)")
        option = key.replace("_", "-")  # as submitit writes it: #SBATCH --<option>=<value>
        if option not in known:
            raise SweepError(f"{field}: sbatch has no option --{option} (see sbatch --help)")
        if option in MANAGED_OPTIONS:
            owner = MANAGED_OPTIONS[option]
            raise SweepError(f"{field}: --{option} is " + (f"set by launcher.{owner}; set that instead" if owner
                                                           else "written by submitit itself; leave it out"))
        if value is None or not isinstance(value, (str, int, float, bool)) or "\n" in str(value) \
                or "\r" in str(value):
            raise SweepError(f"{field}={value!r} must be a string, number or true, without newlines")


# ------------------------------------------------------------------------------------------
# what the cluster offers

@dataclass
class Node:
    partition: str
    default: bool
    available: str          # the partition's state: up, down, drain, inact
    name: str
    cpus: int
    memory_mb: int
    state: str              # the node's state: idle, mixed, allocated, drained, down, ...
    time_limit_min: float | None  # the partition's limit; None: infinite
    gpus: int


SINFO_FORMAT = "%P|%a|%N|%c|%m|%T|%l|%G"


def parse_time_limit(text: str) -> float | None:
    """Minutes of a Slurm time limit: [days-]hours:minutes:seconds, minutes:seconds, minutes;
    None for infinite (or what cannot be read)."""
    text = text.strip()
    if not text or text.lower() in ("infinite", "unlimited", "n/a"):
        return None
    days, _, rest = text.rpartition("-") if "-" in text else ("0", "", text)
    try:
        parts = [int(p) for p in rest.split(":")]
        days = int(days or 0)
    except ValueError:
        return None
    if len(parts) == 3:
        hours, minutes, seconds = parts
    elif len(parts) == 2:
        hours, minutes, seconds = (parts[0], parts[1], 0) if "-" in text else (0, parts[0], parts[1])
    elif len(parts) == 1:
        hours, minutes, seconds = (parts[0], 0, 0) if "-" in text else (0, parts[0], 0)
    else:
        return None
    return days * 24 * 60 + hours * 60 + minutes + seconds / 60


def _gpus(gres: str) -> int:
    """GPUs per node in a GRES string such as gpu:4, gpu:a100:4(S:0-1) or (null)."""
    total = 0
    for item in gres.split(","):
        match = re.match(r"gpu(?::[^:(]+)?:(\d+)", item.strip())
        if match:
            total += int(match.group(1))
    return total


def parse_sinfo(text: str) -> list[Node]:
    nodes = []
    for line in text.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 8:
            continue
        partition, available, name, cpus, memory, state, limit, gres = fields
        try:
            cpus_n, memory_n = int(cpus.rstrip("+")), int(memory.rstrip("+"))
        except ValueError:
            continue
        nodes.append(Node(partition.rstrip("*"), partition.endswith("*"), available, name, cpus_n, memory_n,
                          state.rstrip("*~#!%$@^-"), parse_time_limit(limit), _gpus(gres)))
    return nodes


UNUSABLE_STATES = ("down", "drain", "drained", "draining", "fail", "failing", "inval", "maint", "future",
                   "unknown", "not_responding", "power_down", "powered_down")


def check_cluster(launcher: dict, run=subprocess.run) -> list[str] | None:
    """Check the request against what `sinfo` reports. Raises SweepError for a request no node
    of the partition can meet; returns notes (e.g. every node drained: it may run later), or
    None when sinfo does not answer (no check made)."""
    try:
        out = run(["sinfo", "-h", "-N", "-o", SINFO_FORMAT], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    nodes = parse_sinfo(out.stdout)
    if not nodes:
        return None
    partitions = sorted({n.partition for n in nodes})
    wanted = launcher.get("partition")
    if wanted is None:
        defaults = {n.partition for n in nodes if n.default}
        if not defaults:
            raise SweepError(f"launcher.partition is not set and the cluster has no default partition; "
                             f"choose one of {partitions}")
        wanted = sorted(defaults)[0]
        label = f"the default partition {wanted!r}"
    else:
        label = f"partition {wanted!r}"
        # sbatch takes a comma-separated list of partitions: the job runs in any of them
        missing = [p for p in wanted.split(",") if p not in partitions]
        if missing:
            raise SweepError(f"launcher.partition={wanted!r}: the cluster has no partition "
                             f"{', '.join(map(repr, missing))}; it has {partitions}")
    mine = [n for n in nodes if n.partition in wanted.split(",")]
    cpus, mem_gb = launcher.get("cpus_per_task"), launcher.get("mem_gb")
    gpus, timeout = launcher.get("gpus_per_node") or 0, launcher.get("timeout_min")
    most_cpus = max(n.cpus for n in mine)
    if cpus > most_cpus:
        raise SweepError(f"launcher.cpus_per_task={cpus}: no node of {label} has that many CPUs (at most "
                         f"{most_cpus}); the job would never start")
    most_mb = max(n.memory_mb for n in mine)
    if mem_gb * 1024 > most_mb:
        raise SweepError(f"launcher.mem_gb={mem_gb}: no node of {label} has that much memory (at most "
                         f"{most_mb} MB = {most_mb // 1024} GB); the job would never start")
    fits = [n for n in mine if n.cpus >= cpus and n.memory_mb >= mem_gb * 1024]
    if not fits:
        raise SweepError(f"launcher.cpus_per_task={cpus} with launcher.mem_gb={mem_gb}: no single node of "
                         f"{label} has both; the job would never start")
    if gpus:
        most_gpus = max(n.gpus for n in fits)
        if most_gpus == 0:
            raise SweepError(f"launcher.gpus_per_node={gpus}: {label} has no GPUs (GRES); choose a GPU "
                             "partition with launcher.partition, or set launcher.gpus_per_node=0")
        if gpus > most_gpus:
            raise SweepError(f"launcher.gpus_per_node={gpus}: no node of {label} has that many GPUs (at most "
                             f"{most_gpus})")
    limits = [n.time_limit_min for n in mine]
    if timeout is not None and None not in limits and timeout > max(limits):
        raise SweepError(f"launcher.timeout_min={timeout}: above the time limit of {label} "
                         f"({max(limits):g} min); the job would never start")
    notes = []
    if all(n.available != "up" for n in mine):
        notes.append(f"{label} is {mine[0].available}: the jobs will wait until it is up")
    if all(any(n.state.startswith(s) for s in UNUSABLE_STATES) for n in fits):
        states = Counter(n.state for n in fits)
        notes.append(f"every node of {label} that fits the request is " + ", ".join(states) +
                     ": the jobs will wait until one is back")
    return notes


# ------------------------------------------------------------------------------------------
# after submitting

# Pending reasons that mean a job can never start as submitted (the request is beyond what the
# partition, the QOS or the account allows, or a dependency can never be met); every other reason
# (Resources, Priority, ReqNodeNotAvail, BeginTime, held, partition down, ...) can change.
NEVER_RUN_REASONS = frozenset({
    "PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints", "InvalidAccount",
    "InvalidQOS", "DependencyNeverSatisfied", "QOSJobLimit", "AccountNotAllowed", "QOSNotAllowed",
    "PartitionNotAllowed", "ReqNodeNotAvail_BadConstraints", "FrontEndDown_BadConstraints",
})
EXPLANATIONS = {
    "Resources": "waiting for free CPUs, memory or GPUs",
    "Priority": "other jobs come first",
    "None": "not yet looked at by the scheduler",
    "PartitionConfig": "the request exceeds what the partition's nodes offer (CPUs, memory, GPUs or tasks per node)",
    "PartitionNodeLimit": "more nodes than the partition allows",
    "PartitionTimeLimit": "a time limit above the partition's",
    "BadConstraints": "no node has the requested features",
    "InvalidAccount": "the account is not valid",
    "InvalidQOS": "the QOS is not valid",
    "DependencyNeverSatisfied": "a dependency that can never be met",
    "ReqNodeNotAvail": "a node it needs is down, drained or reserved",
    "BeginTime": "its begin time has not come",
    "JobHeldUser": "held by its user (scontrol release)",
    "JobHeldAdmin": "held by an administrator",
    "PartitionDown": "the partition is down",
    "PartitionInactive": "the partition is inactive",
    "Reservation": "waiting for its reservation",
    "Dependency": "waiting for a job it depends on",
}


def can_never_run(reason: str) -> bool:
    reason = reason.split(",")[0].strip()
    return reason in NEVER_RUN_REASONS or bool(re.match(r"(QOS|Assoc)Max\w*Per(Job|Node)\w*Limit$", reason)) \
        or bool(re.match(r"QOSMin\w+", reason))


def explain(reason: str) -> str:
    base = reason.split(",")[0].strip()
    if base in EXPLANATIONS:
        return EXPLANATIONS[base]
    if can_never_run(base):
        return "above a per-job limit of its QOS or account"
    return "see `man squeue`, JOB REASON CODES"


def _array_size(job_id: str) -> int:
    """How many array tasks a squeue id stands for: 7_3 -> 1, 7_[0-3,5] -> 5, 7_[0-9%2] -> 10."""
    match = re.search(r"_\[([^\]]*)\]", job_id)
    if not match:
        return 1
    count = 0
    for part in match.group(1).split("%")[0].split(","):
        low, _, high = part.partition("-")
        try:
            step = 1
            if ":" in high:
                high, step_text = high.split(":")
                step = int(step_text)
            count += (int(high) - int(low)) // step + 1 if high else 1
        except ValueError:
            count += 1
    return count


@dataclass
class Watch:
    """What the jobs did while watched: all started; or tasks pending, by reason."""
    started: bool = False
    pending: Counter = field(default_factory=Counter)
    never: Counter = field(default_factory=Counter)
    unknown: bool = False   # squeue did not answer
    seconds: float = 0.0

    def describe(self) -> str:
        if self.unknown:
            return "could not ask squeue whether the jobs started"
        if self.never:
            return "; ".join(f"{n} job(s) pending with reason {r}: {explain(r)}: they can never run as submitted"
                             for r, n in self.never.items())
        if self.started:
            return f"all jobs started within {self.seconds:.0f} s"
        return "; ".join(f"{n} job(s) pending with reason {r} ({explain(r)})" for r, n in self.pending.items())


def watch_start(job_ids: list[str], seconds: float = WATCH_SECONDS, poll: float = 1.0,
                run=subprocess.run) -> Watch:
    """Poll squeue until every job has started (or left the queue), at most `seconds`; stop at
    once when a job pends for a reason that means it can never run."""
    arrays = sorted({job_id.split("_")[0] for job_id in job_ids})
    start = time.time()
    while True:
        try:
            out = run(["squeue", "-h", "-j", ",".join(arrays), "-o", "%i|%T|%r"], capture_output=True,
                      text=True, timeout=15)
        except (OSError, subprocess.SubprocessError):
            return Watch(unknown=True, seconds=time.time() - start)
        if out.returncode != 0 and "Invalid job id" not in (out.stderr or ""):
            return Watch(unknown=True, seconds=time.time() - start)
        pending, never = Counter(), Counter()
        for line in (out.stdout if out.returncode == 0 else "").splitlines():
            fields = line.strip().split("|")
            if len(fields) != 3 or fields[1] != "PENDING":
                continue
            reason = fields[2].strip()
            (never if can_never_run(reason) else pending)[reason.split(",")[0]] += _array_size(fields[0])
        elapsed = time.time() - start
        if never:
            return Watch(pending=pending, never=never, seconds=elapsed)
        if not pending:
            return Watch(started=True, seconds=elapsed)
        if elapsed >= seconds:
            return Watch(pending=pending, seconds=elapsed)
        time.sleep(poll)


def cancel(job_ids: list[str], run=subprocess.run) -> None:
    arrays = sorted({job_id.split("_")[0] for job_id in job_ids})
    run(["scancel", *arrays], capture_output=True, text=True, timeout=30)
