"""Branch sweeps (python -m sweeps.branch) and the local critical batch (critbatch.local_batch):
validated before anything runs, one trunk and its branches from its saved states, and on linreg
the measured local critical batch against the exact one from the expected-loss recursion."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from critbatch import records
from critbatch.branches import state_path
from critbatch.local_batch import load_branch_sweep, local_critical_batches
from sweeps.branch import compose, launch
from tests.reference.linreg_dynamics import expected_excess_loss, linreg_problem

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
