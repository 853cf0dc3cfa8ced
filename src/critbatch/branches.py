"""Branch runs (Merrill et al. 2025, "Critical Batch Size Revisited"): the run side.

A *trunk* is an ordinary run at batch size B0 that also saves its step's state (parameters and
optimizer) at branch points: at the steps of log.states_at_steps, and where it first meets each
goal when log.states_at_goals (the logged step at which the crossing is noticed). A *branch* is a
run whose RunConfig.branch names its trunk (by run name), the trunk step it starts from and its
multiplier k: it loads that state, trains at k B0 examples per step with an lr and a seed of its
own for a window of examples (budget.max_examples), and records its loss after the window on a
fixed evaluation set (summary.branch_loss), beside the trunk's loss where it started
(summary.branch_start_loss). critbatch.local_batch turns those losses into the local critical
batch.

The training loop calls three hooks: keep_trunk_states at its logged steps, start_from_trunk
before a branch's first step, and finish_branch as a branch ends. A trunk's states lie in its run
directory (STATES_DIR), and a branch finds them in the trunk's directory beside its own
(sweep/runs/<trunk>/states/), so that where a sweep lives is not part of any run's identity.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from critbatch import records
from critbatch.config import BranchConfig, ConfigError, RunConfig

if TYPE_CHECKING:
    from critbatch.tasks import Task


class Book(Protocol):
    """What the hooks use of a run's book (critbatch.monitor.RunBook)."""
    run_name: str
    summary: Any

    def note(self, **values: Any) -> None: ...


class Training(Protocol):
    """What the hooks read and change of the training loop (critbatch.train.Training), declared
    here so that the loop imports the hooks and not the other way round."""
    config: RunConfig
    step: int
    books: list[Book]
    packed: bool
    checkpoint_dir: Path | None
    train_step: Any
    task: Task
    device: Any

STATES_DIR = "states"
#: examples of a streaming task's evaluation set (the same for every branch: common random numbers)
STREAM_EVALUATION_EXAMPLES = 16_384
#: a larger dataset (the LM's 4.5M windows) is evaluated on this many examples of it, fixed by a seed
DATASET_EVALUATION_EXAMPLES = 1024
_EVALUATION_SEED = 0
_CHUNK = 4096


def state_path(run_dir: str | Path, step: int) -> Path:
    """Where a trunk in `run_dir` keeps its state at `step`."""
    return Path(run_dir) / STATES_DIR / f"step_{step}.pt"


def trunk_state_path(branch_run_dir: str | Path, branch: BranchConfig) -> Path:
    """The trunk state a branch in `branch_run_dir` starts from: in its trunk's run directory,
    beside its own."""
    return state_path(Path(branch_run_dir).parent / branch.trunk, branch.trunk_step)


@torch.no_grad()
def evaluation_loss(task: Task, model: torch.nn.Module) -> float:
    """The model's mean loss on a fixed evaluation set, the same for every branch: in closed form
    where the task has one (linreg's exact_loss), else over the whole training set (up to
    STREAM_EVALUATION_EXAMPLES examples; a larger one on DATASET_EVALUATION_EXAMPLES of them drawn
    from a fixed seed), else over STREAM_EVALUATION_EXAMPLES fresh samples from a fixed seed. In
    eval mode (no dropout; BatchNorm on its running statistics)."""
    if "exact_loss" in task.eval_metrics:
        return float(task.evaluate(model)["exact_loss"])
    training = model.training
    model.eval()
    try:
        if task.dataset_size is not None:
            device = next(model.parameters()).device  # tasks that gather examples (text) hold no `inputs`
            if task.dataset_size <= STREAM_EVALUATION_EXAMPLES:
                index = torch.arange(task.dataset_size, device=device)
            else:
                generator = torch.Generator().manual_seed(_EVALUATION_SEED)
                index = torch.randperm(task.dataset_size, generator=generator)[:DATASET_EVALUATION_EXAMPLES]
                index = index.sort().values.to(device)
            batches = (task.batch(chunk) for chunk in index.split(_CHUNK))
        else:
            generator = torch.Generator(device=getattr(task, "device", "cpu")).manual_seed(_EVALUATION_SEED)
            batches = (task.sample(_CHUNK, generator) for _ in range(STREAM_EVALUATION_EXAMPLES // _CHUNK))
        total, count = 0.0, 0
        for x, y in batches:
            total += float(task.loss(model(x), y)) * len(y)
            count += len(y)
        return total / count
    finally:
        model.train(training)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


# ---- the trunk ----


def pending_state_step(config: RunConfig, step: int) -> float:
    """The next step after `step` at which the run is to save its state (inf: none), so that the
    loop logs there."""
    later = [s for s in config.log.states_at_steps if s > step]
    return min(later) if later else math.inf


def states_pending(config: RunConfig, step: int) -> bool:
    """A trunk goes on past its goals until its last state is saved."""
    return math.isfinite(pending_state_step(config, step))


def keep_trunk_states(training: Training, newly: list[list[int]]) -> None:
    """At a logged step: save the step's state where the trunk asked for it (a step of
    log.states_at_steps, or a goal first met: `newly`, per member, the goals just crossed) and list
    it in the record's summary.branch_states."""
    config, step = training.config, training.step
    goals = config.goals
    labels = [f"examples {step * config.batch_size}"] if step in config.log.states_at_steps else []
    if config.log.states_at_goals and newly:
        labels += [f"{goals.metric}<={goals.thresholds[j]:g}" for j in newly[0]]
    if not labels:
        return
    if training.packed or len(training.books) != 1 or training.checkpoint_dir is None:
        raise ConfigError("a trunk of branch runs (log.states_at_steps, log.states_at_goals) trains alone, plain, "
                          "with a run directory to keep its states in")
    book = training.books[0]
    path = state_path(training.checkpoint_dir, step)
    buffer = io.BytesIO()
    torch.save({"trunk": book.run_name, "step": step, "train_step": training.train_step.state_dict()}, buffer)
    records.write_atomically(path, buffer.getbuffer())
    saved = {"step": step, "examples": step * config.batch_size, "label": "; ".join(labels),
             "file": str(path.relative_to(training.checkpoint_dir)),
             "loss": _finite(evaluation_loss(training.task, training.train_step.module(0)))}
    earlier = [s for s in book.summary.branch_states or [] if s["step"] != step]
    book.note(branch_states=earlier + [saved])


# ---- a branch ----


def start_from_trunk(training: Training) -> None:
    """Before a branch's first step: its trunk's parameters and optimizer state at the branch
    point, with the branch's own optimizer settings (its lr); the trunk's loss there into the
    summary."""
    config, branch = training.config, training.config.branch
    if training.checkpoint_dir is None:
        raise ConfigError("a branch run finds its trunk's state beside its own run directory: give it one")
    path = trunk_state_path(training.checkpoint_dir, branch)
    if not path.exists():
        raise ConfigError(f"{path}: no state of trunk {branch.trunk!r} at step {branch.trunk_step}; run the trunk "
                          "first (python -m sweeps.branch runs it before its branches)")
    saved = torch.load(path, map_location=training.device, weights_only=False)
    if saved.get("trunk") != branch.trunk or saved.get("step") != branch.trunk_step:
        raise ConfigError(f"{path} holds the state of {saved.get('trunk')!r} at step {saved.get('step')}, not of "
                          f"branch.trunk={branch.trunk!r} at step {branch.trunk_step}")
    own = training.train_step.state_dict()
    trunk = saved["train_step"]
    # the trunk's optimizer state (moments, step counts), the branch's hyperparameters (its lr)
    optimizer = {"state": trunk["optimizer"]["state"], "param_groups": own["optimizer"]["param_groups"]}
    training.train_step.load_state_dict({**trunk, "optimizer": optimizer})
    loss = _finite(evaluation_loss(training.task, training.train_step.module(0)))
    for book in training.books:
        book.note(branch_start_loss=loss)


def finish_branch(training: Training, book: Book) -> None:
    """As a branch ends (its window spent, or diverged): its loss on the evaluation set."""
    if training.config.branch is None:
        return
    book.note(branch_loss=_finite(evaluation_loss(training.task, training.train_step.module(0))))
