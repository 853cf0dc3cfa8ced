"""analysis.pareto end to end on record files written here, on plain CSV tables, and on bad input:
every table and figure is written, and bad input gives `error: ...` (exit 2) or a partial
report with warnings, never a traceback."""
from pathlib import Path

import pandas as pd
import pytest

from analysis import pareto
from analysis.synthetic import Truth, make_record, write_sweep
from critbatch import records
from tests.helpers import FIGURES, TABLES

TRUTH = Truth(thresholds=(0.2, 0.1), s_min=(50.0, 150.0), b_crit=(32.0, 128.0), b_simple=(40.0, 160.0))
BATCH_SIZES = (4, 16, 64, 256, 1024)


def run_main(argv, capsys):
    code = pareto.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Several B, several lr, two goals, curves; plus one partial and one torn record."""
    root = tmp_path_factory.mktemp("sweep")
    write_sweep(root, TRUTH, batch_sizes=BATCH_SIZES, lr_factors=(0.5, 1.0, 2.0), curve_ratio=1.1)
    partial = make_record(TRUTH, 32, 0.1, 0, status=records.RUNNING)
    records.write_record(root / "runs" / "partial" / "record.json", partial)
    torn = root / "runs" / "torn" / "record.json"
    torn.parent.mkdir(parents=True)
    torn.write_text('{"schema_version": 1, "run_id": ')
    return root


@pytest.fixture(scope="module")
def analysed(sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    code = pareto.main([str(sweep), "--out", str(out), "--bootstrap", "50", "--quiet"])
    return code, out


def test_end_to_end_writes_every_table_and_figure(analysed):
    code, out = analysed
    assert code == 0
    for name in TABLES:
        assert (out / name).stat().st_size > 0, name
    for name in FIGURES:
        for ext in ("png", "pdf"):
            assert (out / "figures" / f"{name}.{ext}").stat().st_size > 1000, (name, ext)


def test_end_to_end_tables_hold_the_fit_and_the_best_runs(analysed):
    _, out = analysed
    fits = pd.read_csv(out / "tradeoff_fits.csv").set_index("goal")
    assert list(fits.index) == ["train_error<=0.2", "train_error<=0.1"]
    assert fits["identified"].all()
    for goal, b_crit in zip(fits.index, TRUTH.b_crit):
        row = fits.loc[goal]
        assert row["b_crit_low"] < row["b_crit"] < row["b_crit_high"]
        assert row["b_crit"] == pytest.approx(b_crit, rel=0.2)
        assert row["b_crit_boot_low"] < row["b_crit_boot_high"]
        assert row["b_simple_n"] == len(BATCH_SIZES) and isinstance(row["b_simple_runs"], str)
        assert row["lr_b_noise"] == pytest.approx(TRUTH.b_noise, rel=0.1)
    best = pd.read_csv(out / "best_runs.csv")
    assert len(best) == 2 * len(BATCH_SIZES)
    # the grid is centred on the optimum, so the middle lr wins and no edge is flagged
    assert not best["lr_at_grid_edge"].any()
    for row in best.itertuples():
        assert row.lr == pytest.approx(TRUTH.lr_opt(row.batch_size))
        assert row.examples == row.batch_size * row.steps
    problems = pd.read_csv(out / "input_problems.csv")["problem"].str.cat(sep="\n")
    assert "partial record" in problems and "torn" in problems
    summary = (out / "summary.md").read_text()
    assert "B_crit" in summary and "partial record" in summary


def test_edge_of_grid_warning_reaches_the_tables_and_the_console(tmp_path, capsys):
    # a grid entirely below the optimum: the best lr is always the largest tried
    write_sweep(tmp_path, TRUTH, batch_sizes=BATCH_SIZES, lr_factors=(0.125, 0.25, 0.5), curve_ratio=1.2)
    code, out, err = run_main([tmp_path, "--bootstrap", "0", "--no-figures"], capsys)
    assert code == 0
    best = pd.read_csv(tmp_path / "analysis" / "best_runs.csv")
    assert best["lr_at_grid_edge"].all() and (best["lr_edge"] == "high").all()
    assert "widen the grid upwards" in out
    fits = pd.read_csv(tmp_path / "analysis" / "tradeoff_fits.csv")
    assert fits["warnings"].str.contains("widen the grid upwards at B=4,16,64,256,1024").all()


def test_empty_directory_is_an_error(tmp_path, capsys):
    code, _, err = run_main([tmp_path], capsys)
    assert code == 2 and err.startswith("error:") and "no run records" in err


def test_missing_directory_is_an_error(tmp_path, capsys):
    code, _, err = run_main([tmp_path / "nope"], capsys)
    assert code == 2 and "no such directory" in err


def test_only_partial_records_is_an_error_that_names_them(tmp_path, capsys):
    records.write_record(tmp_path / "runs" / "a" / "record.json",
                         make_record(TRUTH, 32, 0.1, 0, status=records.RUNNING))
    code, _, err = run_main([tmp_path], capsys)
    assert code == 2 and "no finished run records" in err and "partial record" in err


def test_one_batch_size_gives_a_partial_report(tmp_path, capsys):
    write_sweep(tmp_path, TRUTH, batch_sizes=(64,), lr_factors=(0.5, 1.0, 2.0), curve_ratio=1.2)
    code, out, err = run_main([tmp_path, "--out", tmp_path / "o"], capsys)
    assert code == 0
    assert "fitted on only 1 batch size(s): no fit" in out
    assert "no goal could be fitted" in err
    fits = pd.read_csv(tmp_path / "o" / "tradeoff_fits.csv")
    assert not fits["identified"].any() and fits["b_crit"].isna().all()
    best = pd.read_csv(tmp_path / "o" / "best_runs.csv")
    assert len(best) == 2 and best["reached"].all()      # what can be said is still said
    assert (tmp_path / "o" / "figures" / "pareto_fronts.png").exists()


def test_goal_no_run_reached_is_reported_not_fitted(tmp_path, capsys):
    truth = Truth(thresholds=(0.2, 0.01), s_min=(50.0, 1e6), b_crit=(32.0, 128.0), b_simple=(40.0, 160.0))
    write_sweep(tmp_path, truth, batch_sizes=BATCH_SIZES, lr_factors=(0.5, 1.0, 2.0), curve_ratio=1.2)
    code, out, _ = run_main([tmp_path, "--bootstrap", "0", "--no-figures"], capsys)
    assert code == 0
    fits = pd.read_csv(tmp_path / "analysis" / "tradeoff_fits.csv").set_index("goal")
    assert fits.loc["train_error<=0.2", "identified"]
    assert not fits.loc["train_error<=0.01", "identified"]
    assert pd.isna(fits.loc["train_error<=0.01", "b_crit"])
    assert "no run reached this goal" in fits.loc["train_error<=0.01", "warnings"]


# --------------------------------------------------------------------------- plain tables


def write_csv(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def hyperbola_rows(goal="0.1", s_min=100.0, b_crit=64.0, with_lr=True):
    rows = []
    for b in (8, 16, 32, 64, 128, 256, 512):
        for f, slow in ((0.5, 1.3), (1.0, 1.0), (2.0, 1.2)):
            row = {"goal": goal, "batch_size": b, "steps": round(s_min * (1 + b_crit / b) * slow)}
            if with_lr:
                row.update(lr=0.1 * f, b_simple=50.0)
            rows.append(row)
    return rows


def test_from_csv_fits_a_plain_table(tmp_path, capsys):
    path = write_csv(tmp_path / "m.csv", hyperbola_rows("0.1") + hyperbola_rows("0.05", 300, 256))
    code, out, _ = run_main(["--from-csv", path, "--bootstrap", "0"], capsys)
    assert code == 0
    out_dir = tmp_path / "m_analysis"
    fits = pd.read_csv(out_dir / "tradeoff_fits.csv").set_index("goal")
    assert fits.loc[0.1, "b_crit"] == pytest.approx(64, rel=0.02)
    assert fits.loc[0.05, "b_crit"] == pytest.approx(256, rel=0.02)
    for name in ("pareto_fronts", "noise_scales", "lr_vs_batch", "steps_heatmap"):
        assert (out_dir / "figures" / f"{name}.png").exists()
    assert "training_curves" in out and "no training curves" in out   # said, not silently missing


def test_from_csv_with_nan_and_negative_steps_drops_and_says_so(tmp_path, capsys):
    rows = hyperbola_rows(with_lr=False)
    rows[0]["steps"] = -5          # line 2: impossible
    rows[1]["steps"] = float("nan")  # line 3: not reached
    rows[2]["steps"] = 0           # line 4: impossible
    path = write_csv(tmp_path / "m.csv", rows)
    code, _, err = run_main(["--from-csv", path, "--out", tmp_path / "o", "--no-figures"], capsys)
    assert code == 0
    assert "lines 2, 4: steps <= 0" in err and "line 3: no steps" in err
    best = pd.read_csv(tmp_path / "o" / "best_runs.csv")
    assert (best.loc[best["reached"], "steps"] > 0).all()
    steps = pd.read_csv(tmp_path / "o" / "steps_to_goal.csv")
    assert len(steps) == len(rows) - 2
    assert "steps <= 0" in (tmp_path / "o" / "summary.md").read_text()


@pytest.mark.parametrize("content,message", [
    ("goal,batch_size\n0.1,32\n", "missing column(s) steps"),
    ("goal,batch_size,steps\n", "no rows"),
    ("goal,batch_size,steps\n0.1,32,-1\n0.1,64,abc\n", "no usable rows"),
    ("", "not a readable CSV"),
])
def test_from_csv_bad_tables_are_errors(tmp_path, capsys, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    code, _, err = run_main(["--from-csv", path], capsys)
    assert code == 2 and err.startswith("error:") and message in err


def test_from_csv_missing_file_and_conflicting_arguments(tmp_path, capsys):
    code, _, err = run_main(["--from-csv", tmp_path / "none.csv"], capsys)
    assert code == 2 and "no such file" in err
    code, _, err = run_main([tmp_path, "--from-csv", tmp_path / "none.csv"], capsys)
    assert code == 2 and "exactly one" in err


# ---------------------------------------------------------------------------------------------
# analysis.table1: the paper's Table 1 from the same records

def test_table1_row_gives_b_crit_at_the_easiest_and_hardest_fitted_goals(sweep):
    from analysis.table1 import table1_row

    row = table1_row(sweep, label="synthetic", n_bootstrap=0)
    start, average = row["B_crit start"], row["B_crit average"]
    assert start.endswith("<=0.2") and average.endswith("<=0.1"), row
    # the truth: B_crit 32 at the easy goal, 128 at the hard one
    assert float(start.split()[0]) == pytest.approx(32.0, rel=0.25)
    assert float(average.split()[0]) == pytest.approx(128.0, rel=0.25)
    assert row["goals fitted"] == "2 of 2" and row["task"] == "synthetic"
    assert row["runs"] == records.load_sweep(sweep)["run_id"].nunique()


def test_table1_cli_refuses_bad_input(sweep, tmp_path, capsys):
    from analysis import table1

    assert table1.main([str(sweep), "--labels", "a", "b"]) == 2
    assert "2 labels for 1 sweep" in capsys.readouterr().err
    assert table1.main([str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert table1.main([str(sweep)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| task | runs |") and "B_crit start" in out
