"""One schema (issue #13): the launch's settings are typed dataclasses registered with Hydra, built
from critbatch.config's; a wrong type or an unknown key anywhere (command line, preset, local
file) is refused before anything runs, naming the key; run identity, the grid's run keys and the
pack key derive from the schema; each task picks its own grid; -m is refused; --help helps."""
from __future__ import annotations

import dataclasses
import re
import shutil
import sys
from pathlib import Path

import pytest

from critbatch import config as run_config
from critbatch import records
from critbatch.config import NOT_IDENTITY, ConfigError, RunConfig
from critbatch.packed import pack_key
from sweeps import grid, schema
from sweeps.grid import expand
from tests.helpers import CONF, REPO, SMALL, compose, launch, launch_here


def never_runs(monkeypatch):
    from sweeps import launch as launch_module

    def never(*args, **kwargs):
        raise AssertionError("a bad input got as far as running or queueing jobs")

    monkeypatch.setattr(launch_module, "launch_local", never)
    monkeypatch.setattr(launch_module, "launch_submitit", never)


# ---------------------------------------------------------------------------------------------
# wrong types and unknown keys, wherever they come from
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("sweep.batch_sizes=16", "sweep.batch_sizes"),           # a number where a list belongs
    ("task.hidden=abc", "task.hidden"),                      # a task option of the wrong type (was a traceback)
    ("optimizer.weight_decay=abc", "optimizer.weight_decay"),  # passed validation, failed every run
    ("+sweep.batch_size=[8]", "sweep.batch_sizes"),          # Hydra's hint for a typo: was ignored
    ("+optimizer.weight_dacay=0.1", "optimizer.weight_decay"),
    ("budget.max_steps=1e3", "budget.max_steps"),
    ("launcher.threads=two", "launcher.threads"),
    ("packing.max_members=many", "packing.max_members"),
])
def test_wrong_types_and_unknown_keys_are_refused_in_process(tmp_path, monkeypatch, override, key):
    never_runs(monkeypatch)
    with pytest.raises(ConfigError) as raised:
        launch_here(tmp_path / "sweep", *SMALL, override)
    assert key in str(raised.value)
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("override, words", [
    ("sweep.batch_sizes=16", ["sweep.batch_sizes=16 must be a list of integers"]),
    ("+sweep.batch_size=[8]", ["sweep.batch_size", "did you mean sweep.batch_sizes"]),
    ("sweep.batch_size=[8]", ["sweep.batch_size is not a setting (did you mean sweep.batch_sizes?)"]),
    ("task=mnist1 d", ["task=mnist1 d does not exist (did you mean task=mnist1d?)"]),
])
def test_the_command_line_refuses_them_with_status_2(tmp_path, override, words):
    sweep_dir = tmp_path / "sweep"
    result = launch(*SMALL, override, f"hydra.sweep.dir={sweep_dir}", timeout=120)
    assert result.returncode == 2, result.stderr
    for word in words:
        assert word in result.stderr
    assert result.stderr.count("\n") == 2 and result.stderr.startswith("error: ")  # the error and "nothing..."
    assert "nothing was submitted" in result.stderr and "Traceback" not in result.stderr
    assert not sweep_dir.exists()


# (command line, what the one error line must say, what it must not say)
TYPOS = [
    (["sweep.batch_sizs=[16]"], "sweep.batch_sizs is not a setting (did you mean sweep.batch_sizes?)", "+sweep"),
    (["optimizer.lrr=0.1"], "did you mean optimizer.lr?", "+optimizer"),
    (["budget.max_step=10"], "did you mean budget.max_steps?", "+budget"),
    (["sweep.lr.centre.eps_str=1"], "did you mean sweep.lr.centre.eps_star?", "+sweep"),
    (["hydra.swep.dir=x"], "did you mean hydra.sweep?", "+hydra"),
    (["task=mnist", "task.train_exampels=10"], "did you mean task.train_examples?", "+task"),
    (["task=mnist1 d"], "did you mean task=mnist1d?", "Available options"),
    (["task=mnist1d_"], "did you mean task=mnist1d?", "Available options"),
    (["experiment=paper_mnst"], "did you mean experiment=paper_mnist?", "Available options"),
    (["optimizer=momentm"], "did you mean optimizer=momentum?", "Available options"),
    (["task=my_task"], "'hydra.searchpath=[file:///abs/path/myconf]' (myconf/task/my_task.yaml)", "did you mean"),
    (["task=mnist1", "d"], "cannot read the override 'd'", "Traceback"),
    (["sweep.seeds=abc"], "sweep.seeds=abc must be a list of integers or null", "Traceback"),
    # the one case where a + is the answer: an option of the task that its yaml does not set
    (["task=digits", "task.module=mypkg.tasks"], "'+task.module=mypkg.tasks'", "did you mean"),
]


@pytest.mark.parametrize("args, says, not_said", TYPOS, ids=[" ".join(a) for a, _, _ in TYPOS])
def test_typos_are_answered_with_the_right_key_or_name(args, says, not_said):
    from sweeps.launch import preflight

    with pytest.raises(ConfigError) as raised:
        preflight(args)
    message = str(raised.value)
    assert says in message and not_said not in message, message
    assert "\n" not in message


def test_a_task_of_your_own_that_hydra_or_python_cannot_find(tmp_path, monkeypatch):
    from sweeps.launch import preflight

    (tmp_path / "myconf" / "task").mkdir(parents=True)
    (tmp_path / "myconf" / "task" / "my_task.yaml").write_text(
        "# @package _global_\ntask:\n  name: my_task\n  module: mypkg_not_on_the_path.tasks\n")
    # the search path names the folder of the yaml rather than the one above task/
    with pytest.raises(ConfigError, match=re.escape(f"'hydra.searchpath=[file://{tmp_path / 'myconf'}]'")):
        preflight([f"hydra.searchpath=[file://{tmp_path / 'myconf' / 'task'}]", "task=my_task"])
    with pytest.raises(ConfigError, match="not a folder here"):
        preflight([f"hydra.searchpath=[file://{tmp_path / 'elsewhere'}]", "task=my_task"])
    # found by Hydra, its module not by Python: how to put it on the path, and nothing written
    never_runs(monkeypatch)
    with pytest.raises(ConfigError) as raised:
        launch_here(tmp_path / "sweep", f"hydra.searchpath=[file://{tmp_path / 'myconf'}]", "task=my_task",
                    "sweep=digits")
    assert "task.module='mypkg_not_on_the_path.tasks' cannot be imported" in str(raised.value)
    assert "PYTHONPATH" in str(raised.value) and "mypkg_not_on_the_path/" in str(raised.value)
    assert not (tmp_path / "sweep").exists()


@pytest.fixture
def conf_copy(tmp_path) -> Path:
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf, ignore=shutil.ignore_patterns("default.yaml"))
    return conf


@pytest.mark.parametrize("where, text, key", [
    ("experiment/bad.yaml", "# @package _global_\nlauncher:\n  cpus_per_task: four\n", "launcher.cpus_per_task"),
    ("experiment/bad.yaml", "# @package _global_\nsweep:\n  batch_size: [8]\n", "sweep.batch_size"),
    ("experiment/bad.yaml", "# @package _global_\nbudget:\n  max_step: 10\n", "budget.max_step"),
    ("local/default.yaml", "# @package _global_\nlauncher:\n  partitoin: gpu\n", "launcher.partitoin"),
    ("local/default.yaml", "# @package _global_\nnoise_scale:\n  every: often\n", "noise_scale.every"),
])
def test_presets_and_the_local_file_are_checked_too(conf_copy, where, text, key):
    (conf_copy / where).write_text(text)
    overrides = ["experiment=bad"] if where.startswith("experiment") else []
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        schema.check(schema.compose(overrides, config_path=str(conf_copy)))


def test_task_options_are_checked_against_the_constructor():
    with pytest.raises(ConfigError, match=r"digits: hidden must be an integer, got 'abc' \(task.hidden: int = 128\)"):
        expand(compose(*SMALL, "task.hidden=abc"))
    with pytest.raises(ConfigError, match=r"digits: dropout must be a number, got 'x' \(task.dropout"):
        expand(compose(*SMALL, "task.dropout=x"))
    with pytest.raises(ConfigError, match="has no option"):
        expand(compose(*SMALL, "+task.hiden=3"))
    assert expand(compose(*SMALL, "task.dropout=0"))  # an int where a float is asked: fine


def test_plain_dicts_given_to_train_are_typed_too():
    base = {"task": {"name": "digits"}, "device": "cpu"}
    for changes, message in [({"optimizer": {"weight_decay": "abc"}}, "optimizer.weight_decay='abc' must be a number"),
                             ({"optimizer": {"betas": [0.9]}}, "optimizer.betas=[0.9] must be a list of 2 numbers"),
                             ({"log": {"checkpoint_seconds": "often"}}, "log.checkpoint_seconds"),
                             ({"noise_scale": {"enabled": "yes"}}, "noise_scale.enabled")]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
            RunConfig.from_dict({**base, **changes})


# ---------------------------------------------------------------------------------------------
# identity, run keys and pack key derive from the schema
# ---------------------------------------------------------------------------------------------

def test_run_ids_of_existing_records_are_unchanged():
    """The ids of records written before the identity was derived from the schema (an explicit
    allowlist then): a relaunch still finds them complete. Adding a top-level field to RunConfig
    changes every id (it counts as null where absent): update this on purpose, never by accident."""
    config = {"task": {"name": "digits", "hidden": 32, "depth": 1, "dropout": 0.0, "data_dir": "/x"},
              "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "betas": [0.9, 0.999], "eps": 1e-08,
                            "weight_decay": 0.0},
              "batch_size": 16, "seed": 0, "goals": {"metric": "train_error", "thresholds": [0.3, 0.2]},
              "budget": {"max_steps": 400, "max_examples": None, "max_seconds": None}, "sampling": "with_replacement",
              "noise_scale": {"every": 10, "micro_batches": 4}, "smoothing": {"relative_window": 0.05},
              "divergence": {"loss_ratio": 10.0}, "log": {"relative_interval": 0.05}, "device": "auto",
              "cuda_graphs": "auto"}
    assert records.run_id(config) == "91f69e3122a8"
    assert records.sweep_variant(config) == "6e5bf92d55c7"  # as sweep.json files name it
    assert records.run_id({**config, "optimizer": {**config["optimizer"], "module": None}}) == "91f69e3122a8"


def test_a_new_setting_is_part_of_the_identity_by_default(monkeypatch):
    base = RunConfig.from_dict({"device": "cpu"}).to_dict()
    # a new field in a section, and a new top-level field
    assert records.run_id({**base, "noise_scale": {**base["noise_scale"], "new_knob": 1}}) != records.run_id(base)
    extended = dataclasses.make_dataclass("ExtendedRunConfig", [("new_setting", int, 3)], bases=(RunConfig,),
                                          frozen=True)
    monkeypatch.setattr(run_config, "RunConfig", extended)
    with_field = extended().to_dict()
    assert records.run_id(with_field) != records.run_id({**with_field, "new_setting": 4})
    # ... unless excluded: bookkeeping, where it ran, where the data and code live
    for path in NOT_IDENTITY:
        section, _, key = path.partition(".")
        changed = ({**base, section: {**base[section], key: "/elsewhere"}} if key
                   else {**base, section: "something else"})
        assert records.run_id(changed) == records.run_id(base), path


def test_pack_key_ignores_only_the_lr_and_bookkeeping():
    base = RunConfig.from_dict({"device": "cpu"})
    other_lr = RunConfig.from_dict({"device": "cpu", "optimizer": {"lr": 0.3}})
    assert pack_key(base) == pack_key(other_lr)
    for changes in ({"optimizer": {"momentum": 0.5}}, {"noise_scale": {"every": 5}}, {"device": "auto"},
                    {"task": {"name": "digits", "hidden": 64}}):
        assert pack_key(RunConfig.from_dict({"device": "cpu", **changes})) != pack_key(base), changes


# ---------------------------------------------------------------------------------------------
# one place per default; each task its own grid
# ---------------------------------------------------------------------------------------------

def test_each_default_lives_in_the_schema():
    cfg = compose()
    assert cfg["budget"]["max_steps"] == RunConfig().budget.max_steps  # not a second value in yaml
    assert cfg["noise_scale"] == RunConfig().to_dict()["noise_scale"]
    assert compose("launcher=slurm")["launcher"]["timeout_min"] == schema.LauncherConfig().timeout_min


def test_each_task_picks_its_own_grid_or_says_to_choose_one():
    assert compose()["sweep"]["batch_sizes"] == compose("sweep=mnist1d")["sweep"]["batch_sizes"]  # the default task
    assert compose("task=linreg")["sweep"] == compose("task=linreg", "sweep=linreg")["sweep"]
    assert compose("task=linreg", "sweep=digits")["sweep"] == compose("sweep=digits")["sweep"]  # asked for
    with pytest.raises(ConfigError, match=r"sweep.batch_sizes is not set: task 'mnist' selects no grid") as raised:
        compose("task=mnist")
    assert "sweep=NAME" in str(raised.value) and "experiment=" in str(raised.value)
    assert compose("experiment=paper_mnist")["sweep"]["batch_sizes"][0] == 4


# ---------------------------------------------------------------------------------------------
# Hydra as Hydra users expect
# ---------------------------------------------------------------------------------------------

def test_multirun_is_refused_with_what_to_do_instead(tmp_path, monkeypatch, capsys):
    """Before: Hydra announced 2 jobs and the first one's exit ended the process after one."""
    result = launch("-m", "task=digits,linreg", f"hydra.sweep.dir={tmp_path / 'sweep'}", timeout=60)
    assert result.returncode == 2
    assert "sweep.batch_sizes" in result.stderr and "analysis.pareto" in result.stderr
    assert not (tmp_path / "sweep").exists()
    from sweeps import launch as launch_module

    monkeypatch.setattr(sys, "argv", ["sweeps.launch", "--multirun", "optimizer=sgd,adam"])
    with pytest.raises(SystemExit) as exited:
        launch_module.main()
    assert exited.value.code == 2 and "-m/--multirun is not supported" in capsys.readouterr().err


def test_help_says_what_the_command_does_and_lists_groups_and_keys():
    result = launch("--help", timeout=60)
    assert result.returncode == 0
    for words in ("critical batch size", "task: ", "optimizer: ", "sweep: digits, linreg", "launcher: ",
                  "experiment: ", "sweep.batch_sizes", "sweep.lr.values", "goals.thresholds", "hydra.sweep.dir",
                  "-m/--multirun"):
        assert words in result.stdout, words


def test_next_commands_use_this_interpreter_and_the_real_overrides():
    from sweeps.launch import command, relaunch_command

    assert command("analysis.pareto", "/s d").startswith(f"{sys.executable} -m analysis.pareto ")
    again = relaunch_command(["task=linreg", "+sweep.x=1", "hydra.sweep.dir=/old"], Path("/s"))
    assert again == f"{sys.executable} -m sweeps.launch task=linreg +sweep.x=1 hydra.sweep.dir=/s"
