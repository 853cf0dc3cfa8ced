"""The cross-task figure (analysis.compare) and labelled sweep comparisons (analysis.pareto --labels),
on synthetic sweeps whose B_crit and B_simple are known (analysis.synthetic)."""
from __future__ import annotations

import pandas as pd
import pytest

from analysis import compare, pareto
from analysis.synthetic import Truth, write_sweep
from critbatch import records

BATCH_SIZES = (4, 16, 64, 256, 1024)
# B_simple near B_crit at every goal ...
NEAR = Truth(thresholds=(0.2, 0.1), s_min=(50.0, 150.0), b_crit=(32.0, 128.0), b_simple=(40.0, 160.0))
# ... and 25x above it, outside the paper's order of magnitude
FAR = Truth(thresholds=(0.2, 0.1), s_min=(40.0, 100.0), b_crit=(16.0, 64.0), b_simple=(400.0, 1600.0),
            max_steps=30_000)


@pytest.fixture
def two_sweeps(tmp_path):
    dirs = [tmp_path / "near", tmp_path / "far"]
    for sweep_dir, truth in zip(dirs, (NEAR, FAR)):
        write_sweep(sweep_dir, truth, batch_sizes=BATCH_SIZES, lr_factors=(0.5, 1.0, 2.0))
    return dirs


def test_the_figures_table_recovers_the_known_truth(two_sweeps, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert compare.main([*map(str, two_sweeps), "--labels", "near task", "far task", "--out", str(out)]) == 0
    table = pd.read_csv(out / "cross_task.csv")
    assert table["label"].tolist() == ["near task"] * 2 + ["far task"] * 2
    for label, truth in (("near task", NEAR), ("far task", FAR)):
        rows = table[table["label"] == label].sort_values("goal_threshold", ascending=False)
        assert rows["goal_threshold"].tolist() == list(truth.thresholds)
        for (_, row), b_crit, b_simple in zip(rows.iterrows(), truth.b_crit, truth.b_simple):
            assert row["b_crit_low"] <= b_crit <= row["b_crit_high"]
            assert row["b_crit"] == pytest.approx(b_crit, rel=0.15)
            assert row["b_simple"] == pytest.approx(b_simple, rel=0.2)
            assert row["b_simple_over_b_crit"] == pytest.approx(row["b_simple"] / row["b_crit"])
    assert table.loc[table["label"] == "near task", "b_simple_within_10x"].tolist() == [True, True]
    assert table.loc[table["label"] == "far task", "b_simple_within_10x"].tolist() == [False, False]
    assert table["b_simple_path"].isna().all()  # the synthetic records carry no path average: not invented
    assert "at 2 of 4 goals" in capsys.readouterr().out
    png = (out / "figures" / "cross_task.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and (out / "figures" / "cross_task.pdf").is_file()


def test_the_figure_draws_every_goal_with_its_interval_and_the_band(two_sweeps):
    table, _ = compare.cross_task_table(two_sweeps, ["near", "far"])
    figure = compare.plots.b_crit_vs_b_simple_across(table, compare.paper_points())
    ax = figure.axes[0]
    assert ax.get_xscale() == ax.get_yscale() == "log"
    legend = [t.get_text() for t in figure.legends[0].get_texts()]
    assert legend[:2] == ["near", "far"] and any("10x" in text for text in legend)
    points = {(round(x, 6), round(y, 6)) for line in ax.get_lines() for x, y in line.get_xydata()}
    for _, row in table.iterrows():  # each goal's marker, at (B_simple, B_crit)
        assert (round(row["b_simple"], 6), round(row["b_crit"], 6)) in points
    figure.draw_without_rendering()  # lays the figure out, as saving it does
    # the legend sits outside the axes: it hides no point
    assert not figure.legends[0].get_window_extent().overlaps(ax.get_window_extent())


def test_default_labels_are_task_and_optimizer(two_sweeps):
    table, _ = compare.cross_task_table(two_sweeps[:1])
    assert set(table["label"]) == {"synthetic_model / sgd"}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_a_labels_count_that_does_not_match_is_one_error(two_sweeps, tmp_path, capsys):
    argv = [*map(str, two_sweeps), "--labels", "only one", "--out", str(tmp_path / "cmp")]
    assert compare.main(argv) == 2
    assert "1 label(s) for 2 sweep directories" in one_error_line(capsys)
    assert not (tmp_path / "cmp").exists()  # nothing written


@pytest.mark.parametrize("which", ["empty", "missing"])
def test_an_empty_or_missing_directory_is_one_error(which, two_sweeps, tmp_path, capsys):
    bad = tmp_path / which
    if which == "empty":
        bad.mkdir()
    assert compare.main([str(two_sweeps[0]), str(bad), "--out", str(tmp_path / "cmp")]) == 2
    assert str(bad) in one_error_line(capsys)


def test_nothing_fitted_is_one_error(tmp_path, capsys):
    write_sweep(tmp_path / "one_b", NEAR, batch_sizes=(64,), lr_factors=(1.0,))  # one B: no fit
    assert compare.main([str(tmp_path / "one_b"), "--out", str(tmp_path / "cmp")]) == 2
    assert "no goal of any sweep could be fitted" in one_error_line(capsys)


# ------------------------------------------------------------------ analysis.pareto --labels

def test_pareto_labels_name_the_sweeps_and_the_legend_covers_no_data(two_sweeps, tmp_path, capsys):
    out = tmp_path / "pareto"
    argv = [*map(str, two_sweeps), "--labels", "A", "B", "--out", str(out), "--bootstrap", "0", "--no-figures"]
    assert pareto.main(argv) == 0
    printed = capsys.readouterr().out
    assert set(pd.read_csv(out / "tradeoff_fits.csv")["sweep"]) == {"A", "B"}
    assert "## A / synthetic_model / sgd" in printed and "## B / synthetic_model / sgd" in printed
    runs, notes = pareto.load_records(two_sweeps)
    analysis = pareto.analyse(pareto.label_sweeps(runs, two_sweeps, ["A", "B"]), notes=notes)
    figure = pareto.compare_sweeps(analysis, pareto._combos(analysis.fits))
    legend = figure.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["A / synthetic_model / sgd", "B / synthetic_model / sgd"]
    figure.draw_without_rendering()  # lays the figure out, as saving it does
    assert not any(legend.get_window_extent().overlaps(ax.get_window_extent()) for ax in figure.axes)


def test_pareto_labels_count_mismatch_is_one_error(two_sweeps, tmp_path, capsys):
    argv = [*map(str, two_sweeps), "--labels", "A", "--out", str(tmp_path / "out")]
    assert pareto.main(argv) == 2
    assert "--labels: 1 label(s) for 2 sweep directories" in one_error_line(capsys)


def test_the_dataset_a_task_trained_on_is_in_its_name(tmp_path):
    """The record's summary names the dataset (Task.fingerprint); the analysis titles say it."""
    paths = write_sweep(tmp_path / "s", NEAR, batch_sizes=BATCH_SIZES, lr_factors=(1.0,), tasks=("mnist",))
    for path in paths:
        record = records.read_record(path)
        record["summary"].update(data={"dataset": "mnist-5k", "dataset_size": 5000})
        records.write_record(path, record)
    runs, _ = pareto.load_records([tmp_path / "s"])
    assert set(pareto.name_datasets(runs)["task"]) == {"mnist (mnist-5k)"}
    table, _ = compare.cross_task_table([tmp_path / "s"])
    assert set(table["label"]) == {"mnist (mnist-5k) / sgd"}
