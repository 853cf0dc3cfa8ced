"""The package as a user gets it (issue #13): `pip install .` (not -e) gives working commands from
any directory; records are readable by the group; the public API's examples run (doctest); a task
and an optimizer can come from the user's own module."""
from __future__ import annotations

import doctest
import importlib
import os
import shutil
import site
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from critbatch import records
from tests.helpers import CONF, REPO, SMALL, launch_here

SOURCES = ("pyproject.toml", "README.md", "src", "sweeps", "analysis", "conf")


# ---------------------------------------------------------------------------------------------
# a non-editable install, used from another directory
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with the project installed from a wheel (pip install ., not -e); its
    dependencies come from this venv's site-packages (a .pth file), so nothing is downloaded."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    source.mkdir()
    for name in SOURCES:  # a copy: building writes build/ and *.egg-info beside the sources
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "default.yaml"))
        else:
            shutil.copy(path, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(root / "wheel"), str(source)],
                   check=True, capture_output=True, cwd=source)
    wheel = next((root / "wheel").glob("*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "project_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", "--no-index", "--ignore-installed",
                    str(wheel)], check=True, capture_output=True, env=env)
    work = root / "elsewhere"
    work.mkdir()
    return wheel, python, work


def run(python, *args, cwd, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(python), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_the_wheel_holds_every_module_and_config_file(installed):
    wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {f"critbatch/{p.relative_to(REPO / 'src' / 'critbatch')}" for p in (REPO / "src" / "critbatch").rglob("*.py")}
    wanted |= {str(p.relative_to(REPO)) for d in ("sweeps", "analysis") for p in (REPO / d).rglob("*.py")}
    wanted |= {f"sweeps/conf/{p.relative_to(CONF)}" for p in CONF.rglob("*.yaml") if p.parent.name != "local"}
    assert wanted <= names, sorted(wanted - names)


@pytest.mark.slow
def test_a_non_editable_install_works_from_any_directory(installed):
    _, python, work = installed
    where = run(python, "-c", "import sweeps, critbatch; print(sweeps.__file__, critbatch.__file__)", cwd=work)
    assert str(REPO) not in where.stdout and "site-packages" in where.stdout, where.stdout + where.stderr
    assert "critical batch size" in run(python, "-m", "sweeps.launch", "--help", cwd=work).stdout
    sweep = work / "sweep"
    launched = run(python, "-m", "sweeps.launch", "sweep.batch_sizes=[64]", "sweep.lr.count=1", "sweep.seeds=[0]",
                   "goals.thresholds=[0.5]", "launcher.threads=1", f"hydra.sweep.dir={sweep}", cwd=work)
    assert launched.returncode == 0, launched.stderr
    # the next command names this interpreter, and the job log holds what was said
    assert f"{python} -m analysis.pareto {sweep}" in launched.stdout
    log = (sweep / "launch.log").read_text()
    assert "1 runs, 0 already complete, 1 to run" in log and "1/1 runs" in log and "1 done" in log
    status = run(python, "-m", "sweeps.status", str(sweep), cwd=work)
    assert status.returncode == 0 and "1 runs: 1 done" in status.stdout
    analysed = run(python, "-m", "analysis.pareto", str(sweep), "--no-figures", "--bootstrap", "0", cwd=work)
    assert analysed.returncode == 0 and (sweep / "analysis" / "tradeoff_fits.csv").exists(), analysed.stderr


# ---------------------------------------------------------------------------------------------
# records readable by the group
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_records_get_the_permissions_the_umask_gives(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        records.write_record(tmp_path / "record.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "record.json").stat().st_mode & 0o777 == mode
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]  # no temporary file left


# ---------------------------------------------------------------------------------------------
# the public API: the examples in its docstrings run
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("module", ["critbatch.gns", "critbatch.train", "critbatch.tasks", "critbatch.records",
                                    "critbatch.optimizers", "critbatch.tradeoff", "critbatch.typecheck"])
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


# ---------------------------------------------------------------------------------------------
# a task and an optimizer from the user's own module
# ---------------------------------------------------------------------------------------------

USER_MODULE = '''
import torch
from critbatch.optimizers import register_optimizer
from critbatch.tasks import register_task
from critbatch.tasks.digits import Digits


@register_task("user_digits")
class UserDigits(Digits):
    """digits, registered outside critbatch"""


def sgd_update(p, g, lr, state, opt, step):   # the packed rule: plain SGD, one lr per member
    p.sub_(lr * g)


register_optimizer("user_sgd", lambda params, opt, capturable: torch.optim.SGD(params, lr=opt.lr), sgd_update)
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    from critbatch.optimizers import OPTIMIZERS
    from critbatch.tasks import TASKS

    (tmp_path / "my_extensions.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_extensions"
    TASKS.pop("user_digits", None)
    OPTIMIZERS.pop("user_sgd", None)
    sys.modules.pop("my_extensions", None)


def test_a_task_and_an_optimizer_from_the_users_module(tmp_path, user_module):
    from critbatch.train import train_pack

    def configs(task, optimizer, module=None):
        return [{"task": {"name": task, "hidden": 32, **({"module": module} if module else {})},
                 "optimizer": {"name": optimizer, "lr": lr, "module": module}, "batch_size": 32, "device": "cpu",
                 "goals": {"metric": "train_error", "thresholds": [0.5]}, "budget": {"max_steps": 200}}
                for lr in (0.2, 0.5)]

    mine = train_pack(configs("user_digits", "user_sgd", user_module), [None, None], packed=True)
    builtin = train_pack(configs("digits", "sgd"), [None, None], packed=True)
    assert [r["summary"]["steps"] for r in mine] == [r["summary"]["steps"] for r in builtin]
    assert all(r["status"] == records.COMPLETED for r in mine)
    # and through the launcher, named in the config
    sweep = tmp_path / "sweep"
    assert launch_here(sweep, *SMALL, "sweep.batch_sizes=[64]", "goals.thresholds=[0.5]", "task.name=user_digits",
                       f"+task.module={user_module}", "optimizer.name=user_sgd", f"optimizer.module={user_module}",
                       "packing.enabled=true") == 0
    assert set(records.load_sweep(sweep)["task"]) == {"user_digits"}


def test_a_users_optimizer_trains_plain_runs_too(user_module):
    from critbatch.train import train

    record = train({"task": {"name": "digits", "hidden": 32}, "optimizer": {"name": "user_sgd", "lr": 0.3,
                    "module": user_module}, "batch_size": 32, "device": "cpu",
                    "goals": {"metric": "train_error", "thresholds": [0.5]}})
    assert record["status"] == records.COMPLETED


def test_an_unknown_module_or_name_is_refused_before_anything_runs(tmp_path, monkeypatch):
    from critbatch.config import ConfigError

    for override, words in (("+task.module=no_such_module", "task.module='no_such_module' cannot be imported"),
                            ("optimizer.name=lion", "optimizer.name='lion' is not supported")):
        with pytest.raises(ConfigError, match=words):
            launch_here(tmp_path / "sweep", *SMALL, override)
    assert not (tmp_path / "sweep").exists()
