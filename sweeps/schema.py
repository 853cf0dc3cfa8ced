"""The settings of `python -m sweeps.launch`: one typed schema, built from critbatch's dataclasses.

LaunchConfig holds every run setting of critbatch.config.RunConfig (their types and defaults
come from there; batch_size is the grid's), plus what only a launch has: `name`, `paths`, the
grid (`sweep`), the `launcher` and `packing`. A field added to RunConfig or to a dataclass below
is part of the schema at once. Registered with Hydra's ConfigStore as `critbatch_schema`, the
first entry of conf/config.yaml's defaults list, so Hydra checks every key and type given on the
command line, in a preset or in conf/local/ while it composes, before anything runs; the yaml
files hold only the values that differ from these defaults. `check` checks a composed config once
more in plain Python (Hydra's `+key=value` adds keys past a schema) and fills in the defaults.

Nothing here imports Hydra until it is needed (`register`, `compose`, `to_plain`).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from critbatch.config import ConfigError, RunConfig, settings_from_dict, to_plain_values
from critbatch.typecheck import field_hints

SCHEMA_NAME = "critbatch_schema"
MISSING = "???"  # OmegaConf's "no value yet": the key must be set before the launch runs


@dataclass
class LrCentre:
    """The paper's (App. A.2) guess for the best lr at batch size B: eps_star / (1 + b_star/B)^alpha.
    (null: not given. A grid always holds a centre, so that the command line can set one: OmegaConf
    cannot assign a mapping to a structured node that is null.)"""
    eps_star: float | None = None
    b_star: float | None = None
    alpha: float = 1.0


@dataclass
class LrGrid:
    """The learning rates tried at each batch size: `values` (a list, or a mapping batch size ->
    list, taken as given), else `count` values `factor` apart centred on `centre`.

    A centre suits one optimizer: `tuned_for` names it, and `centres` holds those of others by
    name. Run with another optimizer, the grid takes its entry in `centres`, else a conversion
    where one is exact enough (sgd <-> momentum: sweeps.grid.lr_centre), else the centre as it is,
    and the launch warns before anything runs."""
    values: Any = None
    centre: LrCentre | None = field(default_factory=LrCentre)
    factor: float = 1.41421356  # the analysis warns about grids coarser than ~sqrt(2): they overstate steps
    count: int = 5
    tuned_for: str | None = None  # the optimizer `centre` was tuned for (null: unsaid)
    centres: dict[str, LrCentre] | None = field(default_factory=dict)  # other optimizers', e.g. {adam: {...}}


@dataclass
class SweepConfig:
    """The grid: every batch size x every lr of its grid x every seed."""
    batch_sizes: list[int] = MISSING  # type: ignore[assignment]
    seeds: list[int] | None = None    # null: the top-level seed only
    lr: LrGrid = field(default_factory=LrGrid)
    # a relaunch into a directory that holds another sweep (other settings) makes this one its sweep
    allow_new_variant: bool = False


@dataclass
class LauncherConfig:
    """Where the jobs run. One schema for every launcher, so conf/local/ can set cluster values
    whichever launcher is chosen; each launcher reads the keys it needs."""
    name: str = "local"            # local (this process), submitit_local (local subprocesses) or slurm
    group_by: str = "batch_size"   # batch_size: a job trains every lr of one B; run: one job per run; all: one job
    threads: int | None = None     # torch CPU threads per job; null: torch's default (local), cpus_per_task (others)
    workers: int = 1               # local: jobs run at once, each in a process of its own (0: one per CPU core)
    wait: bool = True              # submitit launchers: false submits and returns (then sweeps.status)
    progress_seconds: float = 1.0  # local: how often the progress bar re-reads the runs' records
    timeout_min: int = 120         # per job (array task); a job that reaches it checkpoints its run and requeues:
    signal_delay_s: int = 90       #   SIGUSR2 this many seconds before the limit (SLURM may send it 60 s early)
    max_requeues: int = 3          #   at most this many times per job
    cpus_per_task: int = 2
    gpus_per_node: int = 0
    mem_gb: int = 4
    array_parallelism: int = 64    # at most this many array tasks run at once
    partition: str | None = None   # cluster settings: put them in conf/local/default.yaml
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    job_name: str = "critbatch"
    setup: list[str] = field(default_factory=list)  # shell lines run before each job, e.g. ["module load cuda/12"]
    # One run on several ranks (sweeps/distributed.py), each on batch_size/N examples of every batch:
    processes: int = 1             # local, submitit_local: N ranks spawned on this machine
    tasks_per_node: int = 1        # slurm: N = tasks_per_node x nodes SLURM tasks
    nodes: int = 1
    rank_timeout_s: float = 300.0  # a rank waits this long for the others: a hung rank fails the run after it
    additional_parameters: dict[str, Any] = field(default_factory=dict)  # other sbatch options, e.g. {mail-type: END}


@dataclass
class PackingConfig:
    """The fast path: the runs of one job that differ only in lr train as one packed model (vmap
    over stacked parameters) for B <= max_batch_size, where kernel launches dominate. auto: on a
    GPU only (on a CPU the plain loop is as fast: scripts/bench_fast_path.py). Models with
    BatchNorm always take the plain path. A member's results are its plain twin's."""
    enabled: bool | str = "auto"   # auto, true or false
    max_batch_size: int = 256
    max_members: int = 32


@dataclass
class PathsConfig:
    data_dir: str = "${oc.env:CRITBATCH_DATA_DIR,data}"  # datasets (task files read it as task.data_dir)
    sweep_root: str = "sweeps_out"                        # sweep directories go below it


def _copy(f: dataclasses.Field) -> dataclasses.Field:
    if f.default_factory is not dataclasses.MISSING:
        factory = f.default_factory
        if dataclasses.is_dataclass(factory):  # a settings section: its editable twin
            factory = _editable(factory)
        return field(default_factory=factory, metadata=f.metadata)
    return field(default=f.default, metadata=f.metadata)


@functools.lru_cache(maxsize=None)
def _editable(cls: type) -> type:
    """A non-frozen twin of a frozen settings dataclass (sections included): OmegaConf makes a
    frozen dataclass read-only, and Hydra must apply overrides to the schema."""
    if not cls.__dataclass_params__.frozen:
        return cls
    hints = field_hints(cls)
    fields = [(f.name, _editable(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else hints[f.name], _copy(f))
              for f in dataclasses.fields(cls)]
    twin = dataclasses.make_dataclass(cls.__name__, fields)
    twin.__module__ = __name__
    return twin


def _launch_config() -> type:
    """LaunchConfig: name and paths, every RunConfig field but batch_size, then the grid,
    launcher and packing."""
    run_hints = field_hints(_editable(RunConfig))
    fields = [("name", str, field(default="${task.name}_${optimizer.name}")),
              ("paths", PathsConfig, field(default_factory=PathsConfig))]
    fields += [(f.name, run_hints[f.name], _copy(f)) for f in dataclasses.fields(_editable(RunConfig))
               if f.name != "batch_size"]
    fields += [("sweep", SweepConfig, field(default_factory=SweepConfig)),
               ("launcher", LauncherConfig, field(default_factory=LauncherConfig)),
               ("packing", PackingConfig, field(default_factory=PackingConfig))]
    cls = dataclasses.make_dataclass("LaunchConfig", fields)
    cls.__module__ = __name__
    return cls


LaunchConfig = _launch_config()


def check(cfg: dict) -> dict:
    """The composed config `cfg` (plain values) checked against LaunchConfig, every key and
    type (the task's options are its own: grid.expand checks them), with the defaults filled
    in. Raises ConfigError naming the key."""
    settings = settings_from_dict(LaunchConfig, cfg)
    return to_plain_values(dataclasses.asdict(settings))


# ---------------------------------------------------------------------------------------------
# Hydra


def config_dir() -> str:
    """The launch's Hydra config tree: conf/ beside the sweeps package in a checkout (the
    repository, an editable install), or the copy a built package carries as sweeps/conf."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"no Hydra config tree (config.yaml) in {here / 'conf'} or {here.parent / 'conf'}")


TASK_OPTIONS = "task_options"


def register() -> None:
    """Store LaunchConfig in Hydra's ConfigStore (conf/config.yaml's defaults list names it), and
    each registered task's options with their constructor defaults as `task_options/<task>`
    (a task's yaml puts them under `task:`), so that `task.hidden=64` overrides an option whose
    default lives in the task's code only."""
    from hydra.core.config_store import ConfigStore

    from critbatch.tasks import TASKS, task_options

    store = ConfigStore.instance()
    store.store(name=SCHEMA_NAME, node=LaunchConfig)
    for name in TASKS:
        store.store(group=TASK_OPTIONS, name=name, node={"name": name, **to_plain_values(task_options(name))})


def options(group: str) -> list[str]:
    """The options of a config group in the launch's config tree, e.g. options("sweep")."""
    return sorted(p.stem for p in (Path(config_dir()) / group).glob("*.yaml"))


def to_plain(cfg) -> dict:
    """A composed DictConfig as plain values, interpolations resolved. A key still without a
    value (???) raises ConfigError naming it; a grid that is not set says how to choose one."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True, enum_to_str=True)
    except MissingMandatoryValue as exc:
        key = getattr(exc, "full_key", None) or "a setting"
        message = f"{key} is not set"
        if str(key).startswith("sweep."):
            task = OmegaConf.select(cfg, "task.name", default="?")
            message += (f": task {task!r} selects no grid of its own (conf/task/{task}.yaml names no sweep). "
                        f"Choose one: sweep=NAME ({', '.join(options('sweep'))}), a preset experiment=NAME "
                        f"({', '.join(options('experiment'))}), or give it: 'sweep.batch_sizes=[16,64,256]' with "
                        "'sweep.lr.values=[0.1,0.3]' (or sweep.lr.centre)")
        raise ConfigError(message) from None


def composition_error(exc: BaseException) -> str:
    """Hydra's composition error in one line that names the key: what it was doing, what was
    wrong and where (OmegaConf's full_key)."""
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    first = lambda e: (str(e).strip().splitlines() or [type(e).__name__])[0]  # noqa: E731
    keyed = next((e for e in chain if getattr(e, "full_key", None)), None)
    if keyed is None:
        return str(chain[0]).strip()
    what = first(chain[0])
    return (f"{what}: " if what != first(keyed) else "") + f"{first(keyed)} (key {keyed.full_key})"


def compose(overrides=(), config_path: str | None = None, config_name: str = "config") -> dict:
    """The config `python -m sweeps.launch OVERRIDES` composes (config_name="branch": `python -m
    sweeps.branch`'s, whose schema sweeps.branch registers), as plain values (for scripts and
    tests; sweeps.launch.launch checks it against the schema). A key or type that Hydra refuses
    raises ConfigError naming the key."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register()
    try:
        with initialize_config_dir(config_dir=config_path or config_dir(), version_base="1.3"):
            cfg = hydra_compose(config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(composition_error(exc)) from None
    return to_plain(cfg)
