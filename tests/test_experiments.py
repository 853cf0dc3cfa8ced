"""Experiments have identity (issue #13): load_sweep carries the sweep and the variant of every
run, the analysis fits them apart and warns when a folder mixes variants, several sweeps compare
in one figure, and sweeps.status and the analysis agree on what a sweep holds."""
from __future__ import annotations

import pandas as pd
import pytest

from analysis import pareto
from analysis.synthetic import Truth, write_sweep
from critbatch import records
from sweeps.status import format_status, sweep_status

BATCH_SIZES = (4, 16, 64, 256, 1024)
NARROW = Truth(thresholds=(0.2, 0.1), s_min=(50.0, 150.0), b_crit=(32.0, 128.0), b_simple=(40.0, 160.0),
               max_steps=20_000)
WIDE = Truth(thresholds=(0.2, 0.1), s_min=(40.0, 100.0), b_crit=(64.0, 512.0), b_simple=(80.0, 600.0),
             max_steps=30_000)


def fits_of(out) -> pd.DataFrame:
    return pd.read_csv(out / "tradeoff_fits.csv")


def test_load_sweep_names_the_sweep_and_the_variant(tmp_path):
    write_sweep(tmp_path / "narrow", NARROW, batch_sizes=BATCH_SIZES, lr_factors=(0.5, 1.0))
    frame = records.load_sweep(tmp_path / "narrow")
    assert set(frame["sweep"]) == {"narrow"} and frame["variant"].nunique() == 1
    assert frame["variant"].iloc[0] == records.sweep_variant(
        records.read_record(frame["run_dir"].iloc[0] + "/" + records.RECORD_FILE)["config"])


def test_a_folder_that_mixes_variants_is_fitted_apart_with_a_warning(tmp_path, capsys):
    """Two sweeps that differ in a setting (here the budget; a model width alike), written into one
    folder without sweep.json: before, the analysis pooled them as if they were seeds of one."""
    folder = tmp_path / "mixed"
    write_sweep(folder, NARROW, batch_sizes=BATCH_SIZES, lr_factors=(0.5, 1.0, 2.0))
    write_sweep(folder, WIDE, batch_sizes=BATCH_SIZES, lr_factors=(0.5, 1.0, 2.0))
    with pytest.warns(UserWarning, match="2 sweep variants .* differ in budget.max_steps"):
        frame = records.load_sweep(folder)
    assert frame["variant"].nunique() == 2 and frame.attrs["notes"]
    out = tmp_path / "out"
    assert pareto.main([str(folder), "--out", str(out), "--bootstrap", "0", "--quiet", "--no-figures"]) == 0
    assert "sweep variants" in capsys.readouterr().err
    fits = fits_of(out)
    assert len(fits) == 4 and fits.groupby("goal")["variant"].nunique().eq(2).all()
    hard = fits[fits["goal"] == "train_error<=0.1"].set_index("variant")["b_crit"]
    assert sorted(hard) == [pytest.approx(128, rel=0.15), pytest.approx(512, rel=0.15)]  # each its own, not a blend


def test_a_folder_of_sweeps_is_analysed_per_sweep(tmp_path):
    write_sweep(tmp_path / "all" / "a", NARROW, batch_sizes=BATCH_SIZES, lr_factors=(1.0,))
    write_sweep(tmp_path / "all" / "b", NARROW, batch_sizes=BATCH_SIZES, lr_factors=(1.0,))
    frame = records.load_sweep(tmp_path / "all")
    assert set(frame["sweep"]) == {"a", "b"} and frame["variant"].nunique() == 1


def test_two_sweeps_compare_in_one_figure(tmp_path, capsys):
    dirs = [tmp_path / "x" / "sweep", tmp_path / "y" / "sweep"]
    for sweep, truth in zip(dirs, (NARROW, WIDE)):
        write_sweep(sweep, truth, batch_sizes=BATCH_SIZES, lr_factors=(0.5, 1.0, 2.0))
    out = tmp_path / "compare"
    argv = [*map(str, dirs), "--out", str(out), "--bootstrap", "0", "--no-figures"]
    assert pareto.main(argv) == 0
    printed = capsys.readouterr().out
    fits = fits_of(out)
    assert set(fits["sweep"]) == {"x/sweep", "y/sweep"}  # same directory names: told apart by their paths
    assert "## x/sweep" in printed and "## y/sweep" in printed
    assert pareto.main(argv[:2]) == 2  # several sweeps need --out
    runs, notes = pareto.load_records(dirs)
    analysis = pareto.analyse(runs, notes=notes)
    figure = pareto.compare_sweeps(analysis, pareto._combos(analysis.fits))  # drawn with the other figures
    legend = [t.get_text() for t in figure.legends[0].get_texts()]  # below the axes, off the data
    assert len(legend) == 2 and legend[0].startswith("x/sweep / ") and legend[1].startswith("y/sweep / ")
    assert len(figure.axes[1].get_lines()) == 4  # each sweep's steps and its fitted hyperbola


def test_status_and_analysis_agree_on_what_a_sweep_holds(tmp_path):
    """A relaunch with fewer batch sizes leaves finished runs outside the plan: the analysis
    counts them, and sweeps.status says so; runs of an earlier variant count for neither."""
    sweep = tmp_path / "sweep"
    paths = write_sweep(sweep, NARROW, batch_sizes=BATCH_SIZES, lr_factors=(1.0,))
    configs = [records.read_record(p)["config"] for p in paths]
    planned = configs[:3]
    records.write_record(sweep / records.SWEEP_FILE, {
        "variant": records.sweep_variant(configs[0]),
        "runs": [{"name": records.run_name(c), "run_id": records.run_id(c)} for c in planned]})
    write_sweep(sweep, WIDE, batch_sizes=(16,), lr_factors=(1.0,))  # an earlier sweep's run
    status = sweep_status(sweep)
    with pytest.warns(UserWarning, match="variant"):
        frame = records.load_sweep(sweep)
    assert len(status["runs"]) + len(status["unplanned"]) == frame["run_id"].nunique() == len(configs)
    assert len(status["other_variant"]) == 1
    text = format_status(status)
    assert "2 finished run(s) of this sweep outside its current plan" in text and "1 run(s) of an earlier sweep" in text
