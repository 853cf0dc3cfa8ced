"""The user's path: `python -m sweeps.launch` (the default sweep, unchanged: MNIST-1D's MLP with
SGD), then `python -m analysis.pareto SWEEP_DIR` writes every table and figure from its records,
and the default sweep measures what it is for: every goal fitted on resolved points, B_crit rising
with the goal, B_simple measured where the goals are crossed, and the no-progress rule never
stopping a run before a goal it reaches."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from critbatch import records, tradeoff
from tests.helpers import FIGURES, REPO, TABLES
from tests.test_science import replay_stall

pytestmark = pytest.mark.slow  # the default sweep: minutes on 2 cores


@pytest.fixture(scope="module")
def default_sweep(tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("default") / "sweep"
    launched = subprocess.run([sys.executable, "-m", "sweeps.launch", f"hydra.sweep.dir={sweep_dir}"],
                              cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert launched.returncode == 0, launched.stderr[-3000:]
    return sweep_dir


def test_default_launch_then_analysis_writes_every_table_and_figure(default_sweep, tmp_path):
    out = tmp_path / "report"
    analysed = subprocess.run([sys.executable, "-m", "analysis.pareto", str(default_sweep), "--out", str(out),
                               "--bootstrap", "50"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert analysed.returncode == 0, analysed.stderr[-3000:]
    assert "Traceback" not in analysed.stdout + analysed.stderr
    for table in TABLES:
        assert (out / table).stat().st_size > 0, table
    for figure in FIGURES + ("b_crit_vs_b_simple",):
        for ext in ("png", "pdf"):
            assert (out / "figures" / f"{figure}.{ext}").stat().st_size > 1000, f"{figure}.{ext}"
    fits = pd.read_csv(out / "tradeoff_fits.csv")
    assert len(fits) == 5 and fits["identified"].all(), fits[["goal", "warnings"]]
    # every fitted point resolved, and no poor fit
    for warning in ("poor fit", "fewer than", "censored", "not resolved"):
        assert not fits["warnings"].fillna("").str.contains(warning).any(), (warning, fits["warnings"].tolist())
    ordered = fits.sort_values("goal_threshold", ascending=False)
    assert np.all(np.diff(ordered["b_crit"]) > 0), ordered[["goal", "b_crit"]]   # B_crit rises with the goal
    assert ((ordered["b_crit"] > 16) & (ordered["b_crit"] < 1024)).all()         # inside the swept range
    assert ordered["b_simple"].notna().all() and ordered["b_simple_resolved"].all()
    assert ordered["b_simple_path"].notna().all() and ordered["b_simple_init"].notna().all()


def test_the_default_sweep_fits_only_points_of_twenty_steps_or_more(default_sweep):
    runs = records.load_sweep(default_sweep)
    best = tradeoff.best_runs(runs)
    fitted = best[best["reached"] & ~best["censored"]]
    assert (fitted["steps"] >= tradeoff.MIN_FIT_STEPS).all(), fitted.loc[fitted["steps"] < 20, ["goal", "batch_size"]]


def test_the_no_progress_rule_never_stops_a_default_run_before_a_goal(default_sweep):
    statuses = set()
    for path in (default_sweep / records.RUNS_DIR).rglob(records.RECORD_FILE):
        record = records.read_record(path)
        statuses.add(record["status"])
        stop = replay_stall(record, record["config"]["goals"]["metric"])
        if stop is not None:
            later = [g["step"] for g in record["goals"] if g["reached"] and not g.get("censored") and g["step"] > stop]
            assert not later, (path, stop, later)
    assert records.STALLED not in statuses  # so no run was stopped that might have gone on to a goal
