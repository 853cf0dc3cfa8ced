"""Tasks: a dataset, a model, a loss and the metrics that goals can name, registered by name.

A task is built from plain values (`build_task("digits", hidden=64)`); nothing here knows Hydra.
Constructing a task is cheap and loads no data, so a sweep can validate its whole grid on a login
node; `load(device)` brings the data in (onto the GPU when it fits, batches by index_select).

To add a task: write a `Task` subclass decorated by `@register_task("name")` in a module of your
own and name that module in the task's config (`task.module: mypkg.tasks`): it is imported
before the task is built, here and in every job. Its constructor's annotated arguments are the
task's options, checked by type before anything runs. Then add conf/task/name.yaml (README: "Add
your own task"). The tasks that ship with critbatch are imported at the bottom of this file.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import typing
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from critbatch.typecheck import describe, matches


class TaskError(ValueError):
    """A task that cannot be built or run as asked: the message says which field and what to do."""


class DataMissingError(TaskError):
    """The dataset is not on disk; the message gives the command that downloads it."""


class Task:
    """Base class. Subclasses set `name`, `batch_metrics`, and implement the hooks below.

    Finite datasets keep `inputs` / `targets` as tensors on the training device and batches are
    `inputs[indices]` (or whatever `batch(indices)` makes of them, e.g. windows of a text);
    streaming tasks (fresh samples every step) set `dataset_size = None` and implement
    `sample(n, generator)`.
    """

    name: str = ""
    #: metrics computed on each training batch; goals name them smoothed, as "train_<metric>"
    batch_metrics: tuple[str, ...] = ("loss",)
    #: metrics computed by `evaluate(model)` at logged steps; goals name them as they are
    eval_metrics: tuple[str, ...] = ()

    inputs: torch.Tensor | None = None
    targets: torch.Tensor | None = None

    @property
    def dataset_size(self) -> int | None:
        """Number of training examples, or None for a stream of fresh samples."""
        raise NotImplementedError

    @property
    def goal_metrics(self) -> tuple[str, ...]:
        return tuple(f"train_{m}" for m in self.batch_metrics) + tuple(self.eval_metrics)

    def check_data(self) -> None:
        """Raise DataMissingError (with the download command) if the data is not available."""

    def load(self, device: torch.device) -> None:
        """Load the training data onto `device`."""

    def make_model(self) -> nn.Module:
        raise NotImplementedError

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss over the batch (the mean makes micro-batch gradients average exactly)."""
        raise NotImplementedError

    def metrics(self, output: torch.Tensor, target: torch.Tensor, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-batch metrics named in `batch_metrics`, as 0-d tensors (no host sync)."""
        return {"loss": loss.detach()}

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples at `index` (integers in [0, dataset_size), on the data's device) as (inputs,
        targets). A task whose examples are not stored one by one (windows of a text) makes them here."""
        return self.inputs.index_select(0, index), self.targets.index_select(0, index)

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError(f"task {self.name!r} has a finite dataset; index it instead")

    def fingerprint(self) -> dict:
        """What the data is beyond the task's options (e.g. {"dataset": "mnist-5k"}, a text's SHA-256
        and vocabulary), known without loading: the record's summary.data and the checkpoint keep
        it, and a checkpoint whose fingerprint differs is not resumed (check_fingerprint). Plain
        JSON values; {} for a task whose name and options say it all."""
        return {}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Metrics named in `eval_metrics`, computed at logged steps."""
        return {}


class ClassificationTask(Task):
    """Cross-entropy loss and training error (fraction misclassified) from the same forward pass,
    and their clean counterparts: the model in eval mode (no dropout; BatchNorm on its running
    statistics) on a fixed subset of CLEAN_EXAMPLES training examples. A goal on the batch metric
    of a model with dropout or BatchNorm judges a noisier, biased model; `clean_train_error` is
    the training error of the model itself, as the paper's goals mean it."""

    batch_metrics = ("loss", "error")
    eval_metrics = ("clean_train_loss", "clean_train_error")
    CLEAN_EXAMPLES = 2048
    _clean: tuple[torch.Tensor, torch.Tensor] | None = None

    def loss(self, output, target):
        return F.cross_entropy(output, target)

    def metrics(self, output, target, loss):
        error = (output.detach().argmax(dim=1) != target).float().mean()
        return {"loss": loss.detach(), "error": error}

    @property
    def dataset_size(self) -> int:
        return self.train_size

    train_size: int = 0

    def clean_subset(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The same CLEAN_EXAMPLES training examples (a fixed random subset) at every evaluation."""
        if self._clean is None or self._clean[0].device != self.inputs.device:
            order = torch.randperm(len(self.inputs), generator=torch.Generator().manual_seed(0))
            index = order[:self.CLEAN_EXAMPLES].to(self.inputs.device)
            self._clean = (self.inputs.index_select(0, index), self.targets.index_select(0, index))
        return self._clean

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        x, y = self.clean_subset()
        training = model.training
        model.eval()
        try:
            output = model(x)
        finally:
            model.train(training)
        return {"clean_train_loss": float(self.loss(output, y)),
                "clean_train_error": float((output.argmax(dim=1) != y).float().mean())}


def check_fingerprint(task: Task, saved: dict, source) -> None:
    """Refuse to resume from `source` (a checkpoint) trained on other data than `task` has now."""
    current = task.fingerprint()
    differ = sorted(key for key in set(saved) | set(current) if saved.get(key) != current.get(key))
    if differ:
        raise TaskError(f"{source} was trained on other data than task {task.name!r} has now (fingerprint field(s) "
                        f"{differ} differ: saved {[saved.get(k) for k in differ]}, now "
                        f"{[current.get(k) for k in differ]}); it is not resumed. Restore the data it was "
                        "trained on to resume it, or delete it (and the run's record) to train afresh")


TASKS: dict[str, type[Task]] = {}


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """A class decorator that registers a Task subclass under `name` (task.name in a config)."""
    def decorate(cls: type[Task]) -> type[Task]:
        if name in TASKS:
            raise TaskError(f"task {name!r} is registered twice ({TASKS[name].__module__} and {cls.__module__})")
        cls.name = name
        TASKS[name] = cls
        return cls
    return decorate


@contextlib.contextmanager
def registered_task(name: str, cls: type[Task]) -> Iterator[type[Task]]:
    """Register `cls` as task `name` for the duration of a `with` block (tests, notebooks)."""
    register_task(name)(cls)
    try:
        yield cls
    finally:
        TASKS.pop(name, None)


def task_options(name: str) -> dict[str, object]:
    """The options a task takes, with their defaults."""
    params = inspect.signature(TASKS[name].__init__).parameters
    return {p.name: p.default for p in list(params.values())[1:]
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def option_types(name: str) -> dict[str, Any]:
    """The type each option of task `name` takes: its annotation in the constructor, or, where it
    has none, the type of its default (a number for a float default)."""
    init = TASKS[name].__init__
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # an annotation that cannot be evaluated here: check the others
        hints = {}
    types = {}
    for option, default in task_options(name).items():
        if option in hints:
            types[option] = hints[option]
        elif isinstance(default, (bool, int, float, str)):
            types[option] = float if type(default) is float else type(default)
        else:
            types[option] = Any
    return types


def build_task(name: str, module: str | None = None, **options) -> Task:
    """Build a registered task from plain values, naming the bad field when one is wrong.

    Args:
        name: the registered name of the task (`TASKS`), e.g. "digits".
        module: a module of your own to import first, where the task is registered
            (e.g. "mypkg.tasks"); None for the tasks that ship with critbatch.
        **options: the task's constructor arguments (`task_options(name)`), each checked against
            its annotation before the task is built.

    Returns:
        The task, not yet loaded: building one is cheap and reads no data (`load` does).

    Raises:
        TaskError: an unknown task or option, a value of the wrong type or out of range.

    >>> task = build_task("digits", hidden=64)
    >>> task.name, task.dataset_size, task.goal_metrics[:2]
    ('digits', 1797, ('train_loss', 'train_error'))
    >>> build_task("digits", hidden="abc")
    Traceback (most recent call last):
        ...
    critbatch.tasks.TaskError: digits: hidden must be an integer, got 'abc' (task.hidden: int = 128)
    """
    if module:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise TaskError(f"task.module={module!r} cannot be imported: {exc}") from exc
    if name not in TASKS:
        raise TaskError(f"task.name={name!r} is not a registered task; choose one of {sorted(TASKS)}"
                        + ("" if module else " (or register your own and name its module in task.module)"))
    allowed = task_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TaskError(f"task {name!r} has no option(s) {unknown}; its options are {sorted(allowed)}")
    for option, hint in option_types(name).items():
        if option in options and not matches(options[option], hint):
            shown = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
            raise TaskError(f"{name}: {option} must be {describe(hint)}, got {options[option]!r} "
                            f"(task.{option}: {shown} = {allowed[option]!r})")
    return TASKS[name](**options)


# Importing the modules registers their tasks.
from critbatch.tasks import digits, synthetic  # noqa: E402,F401
from critbatch.tasks import cifar10, mnist, svhn  # noqa: E402,F401
from critbatch.tasks import mnist1d  # noqa: E402,F401
from critbatch.tasks import text  # noqa: E402,F401
from critbatch.tasks import mnist_vae  # noqa: E402,F401
