"""The user's path: `python -m sweeps.launch` (the default sweep, unchanged), then
`python -m analysis.pareto SWEEP_DIR` writes every table and figure from its records."""
from __future__ import annotations

import subprocess
import sys

import pandas as pd

from tests.test_analysis import FIGURES, TABLES
from tests.test_sweeps import REPO


def test_default_launch_then_analysis_writes_every_table_and_figure(tmp_path):
    sweep_dir, out = tmp_path / "sweep", tmp_path / "report"
    launched = subprocess.run([sys.executable, "-m", "sweeps.launch", f"hydra.sweep.dir={sweep_dir}"],
                              cwd=REPO, capture_output=True, text=True, timeout=900)
    assert launched.returncode == 0, launched.stderr[-3000:]
    analysed = subprocess.run([sys.executable, "-m", "analysis.pareto", str(sweep_dir), "--out", str(out),
                               "--bootstrap", "50"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert analysed.returncode == 0, analysed.stderr[-3000:]
    assert "Traceback" not in analysed.stdout + analysed.stderr
    for table in TABLES:
        assert (out / table).stat().st_size > 0, table
    for figure in FIGURES:
        for ext in ("png", "pdf"):
            assert (out / "figures" / f"{figure}.{ext}").stat().st_size > 1000, f"{figure}.{ext}"
    fits = pd.read_csv(out / "tradeoff_fits.csv")
    # The default sweep spans B_crit for the harder digits goals: those fits must be identified,
    # with B_crit inside the swept range and a finite interval.
    hard = fits[fits["goal_threshold"] <= 0.05]
    assert len(hard) >= 2
    assert ((hard["b_crit"] > 8) & (hard["b_crit"] < 1024)).all(), hard[["goal", "b_crit"]]
    assert (hard["b_crit_high"] > hard["b_crit_low"]).all()
    assert hard["b_simple"].notna().all()
