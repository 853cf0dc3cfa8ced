"""`python -m sweeps.branch [overrides]`: the local critical batch (Merrill et al. 2025) from branch runs.

    python -m sweeps.branch                                  # MNIST-1D's MLP with SGD (conf/branches/mnist1d_sgd.yaml)
    python -m sweeps.branch optimizer=adam                   # ... with Adam (conf/branches/mnist1d_adam.yaml)
    python -m sweeps.branch launcher=slurm                   # the branches as one SLURM job array
    python -m sweeps.branch hydra.sweep.dir=DIR              # relaunch: skips what is done

One trunk run (task, optimizer, batch size B0 = branches.trunk.batch_size, lr = branches.trunk.lr)
trains to its goals and saves its state at the branch points: branches.at_examples, and where it
first meets each goal (branches.at_goals). From every state, branches at k B0 examples per step
(k in branches.multipliers), each lr the rule gives (branches.lr_rule: none, linear or sqrt in
k, capped at branches.max_lr, times each of branches.lr_factors) and each seed of branches.seeds
train for branches.window examples, as one job array (the launcher's, as for grids: local,
submitit_local or slurm; leases, skips of complete runs and checkpoints on preemption are the
grid's). The trunk runs first, and alone: with launcher.wait=false the launch submits it and
returns, and the same command, run again once it is done, queues the branches.

Everything is checked before anything is written or queued: every setting's type (Hydra, the
schema below), the trunk as a run, every (multiplier, lr, seed) as a branch run, the window
against every branch's batch size, the branch points against the trunk's budget and batch size.
A bad setting exits with status 2 and a message that names it. Then `python -m
analysis.local_batch SWEEP_DIR [--grid GRID_DIR]` measures the local critical batch.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from critbatch import records
from critbatch.config import ConfigError, RunConfig, settings_from_dict, to_plain_values
from critbatch.monitor import max_steps
from sweeps import schema
from sweeps.grid import RUN_KEYS, Run, SweepError, check_data, check_goals, warn_batch_sizes_above_dataset
from sweeps.launch import (allow_new_variant, check_launcher, check_placement, command, command_line, read_manifest,
                           relaunch_command, report, results, sweep_lock, train_pending)

log = logging.getLogger(__name__)
SCHEMA_NAME = "critbatch_branch_schema"
KIND = "branch"
MULTIRUN_REFUSED = ("-m/--multirun is not supported: one branch sweep (a trunk and its branches) per launch; "
                    "launch once per trunk, each into its own hydra.sweep.dir. Nothing was run.")
LR_RULES = {"none": lambda k: 1.0, "linear": lambda k: float(k), "sqrt": lambda k: math.sqrt(k)}


@dataclass
class TrunkSettings:
    """The trunk: one run at batch size B0 with this lr and seed (every other setting is the
    composed config's, as a grid run's)."""
    batch_size: int = schema.MISSING  # type: ignore[assignment]
    lr: float = schema.MISSING        # type: ignore[assignment]
    seed: int = 0


@dataclass
class BranchSettings:
    """The branches: from each branch point, every multiplier x lr x seed, for `window` examples."""
    trunk: TrunkSettings = field(default_factory=TrunkSettings)
    at_examples: list[int] = field(default_factory=list)   # branch points, in the trunk's examples
    at_goals: bool = True            # ... and where the trunk first meets each goal
    multipliers: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    lr_rule: str = "linear"          # a branch's lr: the trunk's x 1 (none), k (linear) or sqrt(k) (sqrt) ...
    max_lr: float | None = None      # ... at most this ...
    lr_factors: list[float] = field(default_factory=lambda: [1.0])  # ... times each of these (the best is taken)
    window: int = schema.MISSING     # type: ignore[assignment]  # examples each branch trains
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # the local critical batch: the largest k B0 whose branch loses at most this share of the
    # progress the k = 1 branch makes over the window (the analysis's default; it can change it)
    tolerance: float = 0.1
    measure_noise: bool = False      # branches measure no noise scales (their trunk does) unless this


def _branch_launch_config() -> type:
    """The launch's schema (sweeps/schema.py) with `branches` besides its grid."""
    fields = [(f.name, f.type, schema._copy(f)) for f in dataclasses.fields(schema.LaunchConfig)]
    fields.append(("branches", BranchSettings, field(default_factory=BranchSettings)))
    cls = dataclasses.make_dataclass("BranchLaunchConfig", fields)
    cls.__module__ = __name__
    return cls


BranchLaunchConfig = _branch_launch_config()


def register() -> None:
    from hydra.core.config_store import ConfigStore

    schema.register()  # the task options, as for a grid
    ConfigStore.instance().store(name=SCHEMA_NAME, node=BranchLaunchConfig)


def compose(overrides=()) -> dict:
    """The config `python -m sweeps.branch OVERRIDES` composes, as plain values (for tests)."""
    register()
    return schema.compose(overrides, config_name="branch")


# ---------------------------------------------------------------------------------------------
# The plan: the trunk, and the branches from its states


@dataclass(frozen=True)
class BranchPlan:
    trunk: Run
    settings: dict[str, Any]   # `branches`, checked

    @property
    def trunk_batch_size(self) -> int:
        return self.trunk.config["batch_size"]

    def lr(self, multiplier: int, factor: float) -> float:
        s = self.settings
        lr = s["trunk"]["lr"] * LR_RULES[s["lr_rule"]](multiplier)
        if s["max_lr"] is not None:
            lr = min(lr, s["max_lr"])
        return float(f"{lr * factor:.6g}")

    def branch_config(self, trunk_step: int, multiplier: int, factor: float, seed: int) -> dict:
        base, s = self.trunk.config, self.settings
        return {**base, "batch_size": multiplier * self.trunk_batch_size, "seed": seed,
                "optimizer": {**base["optimizer"], "lr": self.lr(multiplier, factor)},
                "budget": {"max_steps": None, "max_examples": s["window"], "max_seconds": None},
                # a branch trains for its window: the no-progress rule is off (and goals stop nothing)
                "divergence": {**base["divergence"], "stall_steps": 0},
                "noise_scale": {**base["noise_scale"], "enabled": s["measure_noise"]},
                "log": {**base["log"], "states_at_steps": [], "states_at_goals": False},
                "branch": {"trunk": self.trunk.name, "trunk_step": trunk_step, "multiplier": multiplier}}

    def branches(self, trunk_step: int) -> list[Run]:
        """Every branch from the trunk's state at `trunk_step`, checked."""
        s, runs = self.settings, []
        for multiplier in s["multipliers"]:
            for factor in s["lr_factors"]:
                for seed in s["seeds"]:
                    values = self.branch_config(trunk_step, multiplier, factor, seed)
                    try:
                        config = RunConfig.from_dict(values)
                    except ConfigError as exc:
                        raise SweepError(f"branch (multiplier={multiplier}, lr={values['optimizer']['lr']:g}, "
                                         f"seed={seed}): {exc}") from exc
                    plain = config.to_dict()
                    runs.append(Run(records.run_name(plain), records.run_id(plain), config, plain))
        return runs

    def branch_points(self, trunk_record: dict) -> list[dict]:
        """The states the trunk saved (summary.branch_states), each a branch point."""
        states = trunk_record["summary"].get("branch_states") or []
        if not states:
            raise SweepError(f"trunk {self.trunk.name} saved no state to branch from (its record lists none): no "
                             "goal was met and no branches.at_examples lies within its run")
        return sorted(states, key=lambda state: state["step"])


def _field(name: str, value, ok: bool, what: str) -> None:
    if not ok:
        raise SweepError(f"branches.{name}={value!r} {what}")


def _ints(values, low: int) -> bool:
    return isinstance(values, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= low for v in values)


def plan(cfg: dict) -> BranchPlan:
    """The trunk and the branch settings of a composed config (checked against the schema),
    everything validated: raises SweepError (a ConfigError) naming the field."""
    s = cfg["branches"]
    B0 = s["trunk"]["batch_size"]
    _field("trunk.batch_size", B0, isinstance(B0, int) and B0 > 0, "must be an integer > 0")
    _field("trunk.lr", s["trunk"]["lr"], s["trunk"]["lr"] > 0 and math.isfinite(s["trunk"]["lr"]), "must be > 0")
    _field("multipliers", s["multipliers"], _ints(s["multipliers"], 1) and 1 in s["multipliers"]
           and len(set(s["multipliers"])) == len(s["multipliers"]),
           "must be distinct integers >= 1 and hold 1 (the branch the others are compared with)")
    _field("lr_rule", s["lr_rule"], s["lr_rule"] in LR_RULES, f"must be one of {list(LR_RULES)}")
    _field("lr_factors", s["lr_factors"], bool(s["lr_factors"]) and all(f > 0 for f in s["lr_factors"]),
           "must be a non-empty list of numbers > 0")
    _field("max_lr", s["max_lr"], s["max_lr"] is None or s["max_lr"] > 0, "must be > 0 or null")
    _field("seeds", s["seeds"], _ints(s["seeds"], 0) and bool(s["seeds"]) and len(set(s["seeds"])) == len(s["seeds"]),
           "must be a non-empty list of distinct integers >= 0")
    _field("tolerance", s["tolerance"], s["tolerance"] > 0, "must be > 0")
    window = s["window"]
    _field("window", window, isinstance(window, int) and window > 0, "must be an integer > 0 (examples)")
    for k in s["multipliers"]:
        _field("window", window, window % (k * B0) == 0,
               f"is not a multiple of the batch size {k} x {B0} = {k * B0} of the branches at multiplier {k}: "
               "every branch must train on the same examples")
    _field("at_examples", s["at_examples"], _ints(s["at_examples"], 0) and all(e % B0 == 0 for e in s["at_examples"]),
           f"must be examples >= 0, multiples of the trunk's batch size {B0}")
    _field("at_examples", s["at_examples"], bool(s["at_examples"]) or s["at_goals"],
           "is empty and branches.at_goals is false: no branch point")
    check_goals(cfg.get("goals"))
    values = {key: cfg[key] for key in RUN_KEYS if key in cfg}
    values.update(task=dict(cfg["task"]), optimizer={**cfg["optimizer"], "lr": s["trunk"]["lr"]}, batch_size=B0,
                  seed=s["trunk"]["seed"], log={**cfg["log"], "states_at_steps": [e // B0 for e in s["at_examples"]],
                                                "states_at_goals": s["at_goals"]})
    try:
        trunk = RunConfig.from_dict(values)
    except ConfigError as exc:
        raise SweepError(f"the trunk (batch_size={B0}, lr={s['trunk']['lr']:g}): {exc}") from exc
    if s["at_examples"] and max(s["at_examples"]) // B0 > max_steps(trunk):
        raise SweepError(f"branches.at_examples={s['at_examples']!r}: {max(s['at_examples'])} examples lie beyond the "
                         f"trunk's budget of {max_steps(trunk)} steps of {B0}; raise budget.max_steps or drop them")
    plain = trunk.to_dict()
    result = BranchPlan(Run(records.run_name(plain), records.run_id(plain), trunk, plain), s)
    branches = result.branches(0)  # every (multiplier, lr, seed) checked as a run, before anything runs
    warn_batch_sizes_above_dataset(branches)
    return result


# ---------------------------------------------------------------------------------------------
# The launch


def check_directory(sweep_dir: Path, manifest: dict | None, trunk: Run, allow: bool) -> None:
    """A directory holds one branch sweep, of one trunk: another trunk (other settings) is refused."""
    if manifest is None or allow:
        return
    if manifest.get("kind") != KIND:
        raise SweepError(f"hydra.sweep.dir={sweep_dir} holds a grid sweep (sweeps.launch), not branches: launch into "
                         "a new directory")
    if manifest.get("trunk") != trunk.name:
        raise SweepError(f"hydra.sweep.dir={sweep_dir} holds the branches of trunk {manifest.get('trunk')}, not of "
                         f"{trunk.name} (its settings differ): launch into a new directory, or add "
                         "sweep.allow_new_variant=true to make this the directory's sweep")


def write_manifest(sweep_dir: Path, cfg: dict, branch_plan: BranchPlan, runs: list[Run], points: list[dict]) -> None:
    """sweep.json: the planned runs (sweeps.status reads them), the trunk, the branch points and
    the settings (the analysis reads the tolerance and the lr rule from it)."""
    manifest = {"created": datetime.now().isoformat(timespec="seconds"), "kind": KIND, "config": cfg,
                "trunk": branch_plan.trunk.name, "trunk_batch_size": branch_plan.trunk_batch_size,
                "branches": branch_plan.settings, "branch_points": points,
                "runs": [{"name": r.name, "run_id": r.run_id, "batch_size": r.config["batch_size"],
                          "lr": r.config["optimizer"]["lr"], "seed": r.config["seed"],
                          "branch": r.config.get("branch")} for r in runs]}
    records.write_record(sweep_dir / records.SWEEP_FILE, manifest)


def launch(cfg: dict, sweep_dir: Path, overrides: list[str] | tuple = (), on_accepted=None) -> int:
    """Check everything, run the trunk, then its branches. Exit status as sweeps.launch's.
    Nothing is written before every check has passed; then `on_accepted()` is called (the
    command line's: SWEEP_DIR/.hydra and launch.log)."""
    cfg = to_plain_values(dataclasses.asdict(settings_from_dict(BranchLaunchConfig, cfg)))
    launcher = cfg["launcher"]
    check_launcher(cfg)
    branch_plan = plan(cfg)
    check_data([branch_plan.trunk])
    check_placement(cfg, [branch_plan.trunk])
    allow = allow_new_variant(cfg)
    check_directory(sweep_dir, read_manifest(sweep_dir), branch_plan.trunk, allow)  # the directory is untouched
    try:
        with sweep_lock(sweep_dir):
            check_directory(sweep_dir, read_manifest(sweep_dir), branch_plan.trunk, allow)  # again, under the lock
            if on_accepted is not None:
                on_accepted()
            write_manifest(sweep_dir, cfg, branch_plan, [branch_plan.trunk], [])
    except OSError as exc:  # e.g. the disk is full
        raise SweepError(f"cannot write {sweep_dir / records.SWEEP_FILE}: {exc}") from exc
    rerun = relaunch_command(overrides, sweep_dir, "sweeps.branch")
    log.info(f"trunk {branch_plan.trunk.name}")
    trained = train_pending(sweep_dir, [branch_plan.trunk], launcher, cfg.get("packing"), rerun, "trunk of")
    if trained.exit_code is not None:
        return trained.exit_code
    if trained.detached:
        results.info(f"\nThe trunk is queued. When it is done ({command('sweeps.status', sweep_dir)}), run this "
                     f"command again to queue its branches: {rerun}")
        return 0
    trunk_path = records.run_dir(sweep_dir, branch_plan.trunk.config) / records.RECORD_FILE
    try:
        trunk_record = records.read_record(trunk_path)
    except records.RecordError as exc:
        log.error(f"error: the trunk did not leave a record: {exc}")
        return 1
    if not records.Status(trunk_record["status"]).complete:
        log.error(f"error: the trunk ended {trunk_record['status']} ({trunk_record['summary'].get('error') or ''}); "
                  f"nothing to branch from. Relaunch to retry it: {rerun}")
        return 1
    points = branch_plan.branch_points(trunk_record)
    runs = [run for point in points for run in branch_plan.branches(point["step"])]
    with sweep_lock(sweep_dir):
        write_manifest(sweep_dir, cfg, branch_plan, [branch_plan.trunk] + runs, points)
    log.info(f"{len(points)} branch point(s) at trunk steps {[p['step'] for p in points]}: {len(runs)} branches")
    trained = train_pending(sweep_dir, runs, launcher, cfg.get("packing"), rerun, "branches of")
    return report(sweep_dir, trained, command("analysis.local_batch", sweep_dir), rerun)


#: `python -m sweeps.branch`. Exit status: 0 done, 1 some runs failed, 2 a setting was refused.
main = command_line("branch", launch, MULTIRUN_REFUSED)

register()

if __name__ == "__main__":
    main()
