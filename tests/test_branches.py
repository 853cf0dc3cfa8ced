"""Branch sweeps (python -m sweeps.branch) and the local critical batch (critbatch.local_batch):
validated before anything runs, one trunk and its branches from its saved states, and on linreg
the measured local critical batch against the exact one from the expected-loss recursion."""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from critbatch import records
from critbatch.branches import state_path
from critbatch.config import ConfigError, RunConfig
from critbatch.local_batch import load_branch_sweep, local_critical_batch, local_critical_batches
from critbatch.train import Interrupted, train_pack
from sweeps.branch import compose, launch, plan
from sweeps.status import sweep_status
from tests.reference.linreg_dynamics import expected_excess_loss, linreg_problem
from tests.test_checkpoint import InterruptAt

# the linreg preset (conf/branches/linreg_sgd.yaml) at the branch points whose window makes
# progress well above the seeds' noise (later ones sit at SGD's noise floor)
LINREG = ["task=linreg", "branches.at_goals=false", "branches.at_examples=[0,512,2048,4096]",
          "branches.multipliers=[1,2,4,8,16,32]", "branches.lr_factors=[0.25,0.5,1.0]", "launcher.threads=1"]


def exact_local_critical_batch(start: np.ndarray, trunk_batch_size: int, multipliers, lrs_of, window: int,
                               tolerance: float) -> int:
    """From parameters `start` (the trunk's at a branch point): every branch's exact expected loss
    after `window` examples (the second-moment recursion), the best lr per multiplier, and the
    largest k B0 whose loss exceeds the k = 1 loss by at most `tolerance` of the k = 1 branch's
    progress. Written out here, apart from critbatch.local_batch."""
    spectrum, w_star = linreg_problem()
    noise_floor = 0.5  # sigma^2 / 2: the loss is the excess loss plus it
    offset = start - w_star
    start_loss = 0.5 * offset @ (spectrum * offset) + noise_floor
    loss = {k: min(expected_excess_loss(spectrum, w_star, 1.0, k * trunk_batch_size, lr,
                                        window // (k * trunk_batch_size), start=start)[-1] + noise_floor
                   for lr in lrs_of(k)) for k in multipliers}
    return trunk_batch_size * max(k for k in multipliers if loss[k] - loss[1] <= tolerance * (start_loss - loss[1]))


@pytest.mark.slow
def test_the_local_critical_batch_on_linreg_is_the_exact_one(tmp_path):
    """A real branch sweep on linreg (trunk at B0 = 8, branches at k = 1..32, the linear lr rule
    times 0.25, 0.5 and 1, 4 seeds): at every branch point the measured local critical batch is
    within one multiplier step (a factor 2) of the exact one, computed from the trunk's own
    parameters there by the expected-loss recursion (the diagonal second moments m_i = d0_i^2
    close on themselves)."""
    cfg = compose(LINREG)
    assert launch(cfg, tmp_path) == 0
    trunk, branches = load_branch_sweep(tmp_path)
    settings, B0 = cfg["branches"], cfg["branches"]["trunk"]["batch_size"]
    measured = local_critical_batches(branches, B0, settings["tolerance"], n_bootstrap=200)
    trunk_dir = records.run_dir(tmp_path, trunk["config"])
    exact = {}
    for state in trunk["summary"]["branch_states"]:
        saved = torch.load(state_path(trunk_dir, state["step"]), weights_only=False)
        start = saved["train_step"]["model"]["weight"].double().numpy().ravel()
        lrs_of = lambda k: sorted(branches.loc[branches["multiplier"] == k, "lr"].unique())  # noqa: E731
        exact[state["step"]] = exact_local_critical_batch(start, B0, settings["multipliers"], lrs_of,
                                                          settings["window"], settings["tolerance"])
    assert set(measured["trunk_step"]) == set(exact) and len(exact) == 4
    for _, point in measured.iterrows():
        print(f"examples {point['examples']}: measured {point['b_local']:g} [{point['low']:g}, {point['high']:g}], "
              f"exact {exact[point['trunk_step']]}")
        assert abs(math.log2(point["b_local"] / exact[point["trunk_step"]])) <= 1, (point.to_dict(), exact)
    # the check has power: the exact values move over training and lie inside the multipliers
    assert len(set(exact.values())) > 1 and max(exact.values()) < 32 * B0


# ---------------------------------------------------------------------------------------------
# validation, identity, the launch
# ---------------------------------------------------------------------------------------------

# a small sweep on digits: a trunk at 16 and branches at 16 and 32 from two states
DIGITS = ["task=digits", "task.hidden=16", "goals.thresholds=[0.5,0.3]", "budget.max_steps=200",
          "branches.trunk.batch_size=16", "branches.trunk.lr=0.3", "branches.at_examples=[0,320]",
          "branches.at_goals=false", "branches.multipliers=[1,2]", "branches.lr_rule=linear", "branches.lr_factors=[1.0]",
          "branches.window=320", "branches.seeds=[0]", "launcher.workers=1", "launcher.threads=1"]


@pytest.fixture(scope="module")
def digits_cfg():
    return compose(DIGITS)


def changed(cfg: dict, key: str, value) -> dict:
    """A deep copy of the composed config with the dotted `key` set to `value`."""
    cfg = copy.deepcopy(cfg)
    *path, last = key.split(".")
    section = cfg
    for name in path:
        section = section[name]
    section[last] = value
    return cfg


@pytest.mark.parametrize("key, value, field", [
    ("branches.window", 100, "branches.window"),                  # not a multiple of k B0
    ("branches.multipliers", [2, 4], "branches.multipliers"),     # no k = 1 to compare with
    ("branches.multipliers", [1, 1], "branches.multipliers"),
    ("branches.lr_rule", "cubic", "branches.lr_rule"),
    ("branches.lr_factors", [], "branches.lr_factors"),
    ("branches.seeds", [-1], "branches.seeds"),
    ("branches.tolerance", 0.0, "branches.tolerance"),
    ("branches.max_lr", -1.0, "branches.max_lr"),
    ("branches.at_examples", [8], "branches.at_examples"),        # between two trunk steps
    ("branches.at_examples", [99999], "branches.at_examples"),    # beyond the trunk's budget
    ("branches.trunk.lr", 0.0, "branches.trunk.lr"),
    ("branches.trunk.batch_size", 0, "branches.trunk.batch_size"),
    ("branches.windo", 3, "branches.windo"),                      # a typo (+key=... on the command line)
    ("task.hidden", 0, "hidden"),                                 # the trunk, as a run
    # every branch, as a run: the trunk (B0 = 16) samples digits' 1797 examples without replacement, the
    # branch at k = 128 (2048 examples a step) cannot
    ({"sampling": "epoch_shuffle", "branches.multipliers": [1, 128], "branches.window": 2048}, None, "exceeds"),
])
def test_bad_branch_settings_are_refused_before_anything_is_written(tmp_path, digits_cfg, key, value, field):
    changes = key if isinstance(key, dict) else {key: value}
    cfg = digits_cfg
    for name, new in changes.items():
        cfg = changed(cfg, name, new)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        launch(cfg, tmp_path / "sweep")
    assert not (tmp_path / "sweep").exists()


def test_hydra_refuses_a_wrong_type_against_the_schema():
    with pytest.raises(ConfigError, match=r"branches\.trunk\.lr"):
        compose([*DIGITS, "branches.trunk.lr=abc"])


def test_a_branch_is_its_trunk_point_multiplier_lr_and_seed(digits_cfg):
    """A branch's run id holds its trunk's (via the trunk's run name, which holds its id), the
    trunk step it starts from, its multiplier, lr and seed."""
    branch_plan = plan(digits_cfg)
    base = branch_plan.branch_config(20, 2, 1.0, 0)
    variants = [branch_plan.branch_config(40, 2, 1.0, 0), branch_plan.branch_config(20, 1, 1.0, 0),
                branch_plan.branch_config(20, 2, 0.5, 0), branch_plan.branch_config(20, 2, 1.0, 1),
                plan(changed(digits_cfg, "branches.trunk.lr", 0.2)).branch_config(20, 2, 1.0, 0),
                plan(changed(digits_cfg, "branches.trunk.seed", 3)).branch_config(20, 2, 1.0, 0)]
    ids = {records.run_id(RunConfig.from_dict(c).to_dict()) for c in [base, *variants]}
    assert len(ids) == 1 + len(variants)
    assert records.run_id(RunConfig.from_dict(branch_plan.branch_config(20, 2, 1.0, 0)).to_dict()) in ids
    assert branch_plan.trunk.run_id[:8] in base["branch"]["trunk"]


@pytest.mark.slow
def test_a_branch_sweep_trains_its_trunk_once_and_a_relaunch_skips_what_is_done(tmp_path):
    cfg = compose(DIGITS)
    assert launch(cfg, tmp_path) == 0
    trunk, branches = load_branch_sweep(tmp_path)
    assert [s["step"] for s in trunk["summary"]["branch_states"]] == [0, 20]
    assert len(branches) == 2 * 2 and set(branches["batch_size"]) == {16, 32}
    assert set(branches["branch_examples"]) == {320} and branches["loss"].map(math.isfinite).all()
    for _, branch in branches.iterrows():  # each started where its trunk was
        assert branch["start_loss"] == pytest.approx(
            next(s["loss"] for s in trunk["summary"]["branch_states"] if s["step"] == branch["trunk_step"]))
    manifest = json.loads((tmp_path / records.SWEEP_FILE).read_text())
    assert manifest["kind"] == "branch" and len(manifest["runs"]) == 1 + 4
    assert sweep_status(tmp_path)["counts"][records.BUDGET_EXHAUSTED] == 4
    written = {p: p.stat().st_mtime for p in (tmp_path / records.RUNS_DIR).glob("*/record.json")}
    assert launch(cfg, tmp_path) == 0  # nothing left to train
    assert {p: p.stat().st_mtime for p in written} == written
    with pytest.raises(ConfigError, match="another trunk|holds the branches of trunk"):
        launch(compose([*DIGITS, "branches.trunk.lr=0.2"]), tmp_path)


def test_a_text_task_branches_and_its_large_training_set_is_evaluated_on_a_fixed_sample(tmp_path):
    """The LM gathers its windows (no `inputs` tensor) and has more of them than the evaluation
    takes whole: the trunk keeps its states, the branches run, and the fixed sample's mean loss
    is the whole training set's within its standard error."""
    from critbatch.branches import DATASET_EVALUATION_EXAMPLES, STREAM_EVALUATION_EXAMPLES, evaluation_loss
    from critbatch.tasks import build_task
    from tests.test_text_task import own_text

    text = own_text(tmp_path, chars=20_000)
    lm = ["task=shakespeare_char", f"task.text_path={text}", "task.context=16", "task.width=16", "task.heads=2",
          "task.layers=1", "task.val_windows=8", "optimizer=adam", "goals.thresholds=[3.0]",
          "noise_scale.enabled=false", "branches.trunk.batch_size=8", "branches.trunk.lr=0.003",
          "branches.at_examples=[0,160]", "branches.at_goals=false", "branches.multipliers=[1,2]",
          "branches.lr_rule=none", "branches.lr_factors=[1.0]", "branches.window=160", "branches.seeds=[0]",
          "budget.max_steps=40", "launcher.workers=1", "launcher.threads=1"]
    sweep = tmp_path / "sweep"
    assert launch(compose(lm), sweep) == 0
    trunk, branches = load_branch_sweep(sweep)
    assert trunk["status"] != records.FAILED and [s["step"] for s in trunk["summary"]["branch_states"]] == [0, 20]
    assert len(branches) == 2 * 2 and branches["loss"].map(math.isfinite).all()

    task = build_task("shakespeare_char", text_path=str(text), context=16, width=16, heads=2, layers=1)
    task.load("cpu")
    assert task.dataset_size > STREAM_EVALUATION_EXAMPLES  # the sample, not the whole set
    torch.manual_seed(0)
    model = task.make_model().eval()
    sampled = evaluation_loss(task, model)
    assert evaluation_loss(task, model) == sampled  # fixed: the same set for every branch
    with torch.no_grad():  # every window's loss, independently of evaluation_loss
        x, y = task.batch(torch.arange(task.dataset_size))
        logits = model(x)
        per_window = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)
    se = float(per_window.std()) / math.sqrt(DATASET_EVALUATION_EXAMPLES)
    assert abs(sampled - float(per_window.mean())) < 4 * se


@pytest.mark.slow
def test_a_preempted_branch_resumes_as_its_uninterrupted_twin(tmp_path):
    """A trunk and a branch each stopped at a step boundary (as SIGTERM stops a job) and resumed
    from their checkpoints leave the records of their uninterrupted twins: the trunk the same
    states, the branch the same loss after its window."""
    branch_plan = plan(compose([*DIGITS, "log.checkpoint_seconds=0"]))
    results = {}
    for name, interrupted in (("twin", False), ("resumed", True)):
        sweep = tmp_path / name
        trunk_dir = records.run_dir(sweep, branch_plan.trunk.config)
        if interrupted:
            with pytest.raises(Interrupted):
                train_pack([branch_plan.trunk.settings], [trunk_dir], interrupt=InterruptAt(12))
        trunk = train_pack([branch_plan.trunk.settings], [trunk_dir])[0]
        branch = branch_plan.branches(20)[1]  # k = 2
        branch_dir = records.run_dir(sweep, branch.config)
        if interrupted:
            with pytest.raises(Interrupted):
                train_pack([branch.settings], [branch_dir], interrupt=InterruptAt(4))
        results[name] = (trunk, train_pack([branch.settings], [branch_dir])[0])
    (trunk_twin, branch_twin), (trunk_resumed, branch_resumed) = results["twin"], results["resumed"]
    assert trunk_resumed["summary"]["resumed_at"] == [12] and branch_resumed["summary"]["resumed_at"] == [4]
    assert [s["loss"] for s in trunk_resumed["summary"]["branch_states"]] == \
        [s["loss"] for s in trunk_twin["summary"]["branch_states"]]
    assert branch_resumed["summary"]["branch_loss"] == branch_twin["summary"]["branch_loss"]
    assert branch_resumed["summary"]["branch_start_loss"] == branch_twin["summary"]["branch_start_loss"]


# ---------------------------------------------------------------------------------------------
# the local critical batch from losses (statistics)
# ---------------------------------------------------------------------------------------------

def synthetic_branches(rng, true_share: dict[int, float], lrs: dict[int, list[float]], seeds: int,
                       noise: float) -> pd.DataFrame:
    """Branches from one point whose mean loss after the window is L_1 + share_k x progress at the
    best lr (the others 0.3 x progress worse), with seed noise of sd `noise` x progress."""
    start, l1 = 2.0, 1.0
    rows = []
    for k, share in true_share.items():
        for i, lr in enumerate(lrs[k]):
            mean = l1 + (share + 0.3 * i) * (start - l1)
            for seed in range(seeds):
                rows.append({"trunk_step": 10, "examples": 160, "label": "x", "start_loss": start, "multiplier": k,
                             "lr": lr, "seed": seed, "loss": mean + noise * (start - l1) * rng.standard_normal(),
                             "branch_examples": 100})
    return pd.DataFrame(rows)


def test_the_local_critical_batch_is_the_largest_multiplier_within_the_tolerance():
    shares = {1: 0.0, 2: 0.02, 4: 0.05, 8: 0.3, 16: 0.6}
    lrs = {k: [0.1 * k, 0.2 * k] for k in shares}  # the first lr is the better one
    exact = synthetic_branches(np.random.default_rng(0), shares, lrs, seeds=3, noise=0.0)
    result = local_critical_batch(exact, trunk_batch_size=16, tolerance=0.1)
    assert result["b_local"] == 4 * 16 and (result["low"], result["high"]) == (64, 64)
    assert result["lrs"][8] == pytest.approx(0.8) and not result["saturated"] and not result["floor"]
    assert local_critical_batch(exact, 16, tolerance=0.01)["floor"]          # only k = 1 within 1%
    assert local_critical_batch(exact, 16, tolerance=0.9)["saturated"]
    diverged = exact.copy()
    diverged.loc[(diverged["multiplier"] == 4) & (diverged["seed"] == 0), "loss"] = math.inf
    assert local_critical_batch(diverged, 16, tolerance=0.1)["b_local"] == 2 * 16  # a diverged seed fails its lr


def test_the_seeds_interval_covers_the_local_critical_batch():
    """With seed noise of 5% of the window's progress and 4 seeds, over 200 repeated sweeps the
    estimate is the true one most of the time and the 95% bootstrap interval over the seeds holds
    it in at least 85% of them (a bootstrap over so few seeds covers a little less than it says)."""
    rng = np.random.default_rng(1)
    shares = {1: 0.0, 2: 0.01, 4: 0.04, 8: 0.25, 16: 0.5}
    lrs = {k: [0.1 * k, 0.2 * k] for k in shares}
    hits = covered = 0
    for _ in range(200):
        result = local_critical_batch(synthetic_branches(rng, shares, lrs, seeds=4, noise=0.05), 16, 0.1,
                                      n_bootstrap=200, seed=int(rng.integers(1 << 30)))
        hits += result["b_local"] == 64
        covered += result["low"] <= 64 <= result["high"]
    assert hits >= 150 and covered >= 170, (hits, covered)


@pytest.mark.slow
@pytest.mark.slurm
def test_branches_run_as_one_slurm_job_array(tmp_path):
    """On the local SLURM cluster: the trunk as one job, then its branches as one job array (one
    task per batch size, launcher.group_by's default), each leaving its record."""
    if shutil.which("sbatch") is None or subprocess.run(["sinfo", "-h"], capture_output=True).returncode:
        if os.environ.get("CI"):
            pytest.fail("no SLURM cluster: run scripts/slurm/start_local_slurm.sh first")
        pytest.skip("no SLURM cluster (start one with scripts/slurm/start_local_slurm.sh)")
    slurm = ["launcher=slurm", "launcher.cpus_per_task=1", "launcher.mem_gb=1", "launcher.timeout_min=10"]
    assert launch(compose([*DIGITS, *slurm]), tmp_path) == 0
    jobs = json.loads((tmp_path / "jobs.json").read_text())
    assert [len(entry["job_ids"]) for entry in jobs] == [1, 2]  # the trunk, then an array of two batch sizes
    trunk, branches = load_branch_sweep(tmp_path)
    assert len(branches) == 4 and branches["loss"].map(math.isfinite).all()


def test_the_command_refuses_a_bad_setting_with_status_2(tmp_path):
    """`python -m sweeps.branch` as typed: Hydra composes, the launch refuses, nothing is written."""
    overrides = [o for o in DIGITS if not o.startswith("branches.window=")] + ["branches.window=100"]
    done = subprocess.run([sys.executable, "-m", "sweeps.branch", *overrides,
                           f"hydra.sweep.dir={tmp_path / 'sweep'}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "branches.window=100" in done.stderr and "nothing was submitted" in done.stderr
    assert not (tmp_path / "sweep").exists()  # no .hydra/, no launch.log either
