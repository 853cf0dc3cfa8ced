"""B_noise by the paper's line search (analysis/line_search.py) against exact values computed
without it: linreg's closed form, and on digits the per-example gradients and Hessian-vector
products of tests/reference/exact_noise.py. At the points chosen B_simple differs from B_noise by
more than 20 %, so a line search that measured the wrong noise scale would fail; and the command
line on a small real sweep, with its bad inputs."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from analysis import line_search as ls
from critbatch import records
from critbatch.config import RunConfig
from critbatch.tasks import build_task
from critbatch.train import train
from tests.reference.exact_noise import exact_noise_scales

TOLERANCE = 0.15


def test_linreg_line_search_matches_the_closed_form_b_noise():
    task = build_task("linreg")  # the default problem, dim 64
    task.load("cpu")
    model = task.make_model()
    with torch.no_grad():
        model.weight.copy_(task.w_star.float()[None] / 2)  # half way to the optimum
    exact = task.exact(model.weight)
    assert abs(exact["exact_b_simple"] / exact["exact_b_noise"] - 1) > 0.2

    search = ls.line_search(ls.FixedPoint(model, task), [8, 32, 128, 512], draws=1000, eps_guess=0.1)
    low, high = search.b_noise_ci
    print(f"linreg at w*/2: line search B_noise {search.b_noise:.1f} [{low:.1f}, {high:.1f}], "
          f"exact {exact['exact_b_noise']:.1f}, ratio {search.b_noise / exact['exact_b_noise']:.3f}")
    assert search.fit.identified
    assert abs(search.b_noise / exact["exact_b_noise"] - 1) < TOLERANCE
    assert low <= exact["exact_b_noise"] <= high
    # the optimal lr of an infinite batch is |G|^2 / G^T H G, here with H = Lambda
    grad = task.spectrum * task.offset(model.weight)
    eps_max = float(grad @ grad / (grad @ (task.spectrum * grad)))
    assert abs(search.fit.eps_max / eps_max - 1) < TOLERANCE


def test_digits_line_search_matches_exact_hessian_b_noise():
    task = build_task("digits", hidden=32)
    task.load("cpu")
    torch.manual_seed(0)
    model = task.make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = torch.Generator().manual_seed(1)
    for _ in range(100):  # B = 64: B_noise is then ~300, inside the batch sizes measured
        index = torch.randint(task.dataset_size, (64,), generator=batches)
        loss = task.loss(model(task.inputs[index]), task.targets[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    exact = exact_noise_scales(model, task.loss, task.inputs, task.targets, dtype=torch.float32)
    assert abs(exact["b_simple"] / exact["b_noise"] - 1) > 0.2

    search = ls.line_search(ls.FixedPoint(model, task), [16, 64, 256, 1024], draws=800, eps_guess=0.1)
    low, high = search.b_noise_ci
    print(f"digits after 100 steps: line search B_noise {search.b_noise:.1f} [{low:.1f}, {high:.1f}], "
          f"exact {exact['b_noise']:.1f}, ratio {search.b_noise / exact['b_noise']:.3f}; "
          f"eps_max {search.fit.eps_max:.3f} vs {exact['grad_sq_norm'] / exact['gHg']:.3f}")
    assert search.fit.identified
    assert abs(search.b_noise / exact["b_noise"] - 1) < TOLERANCE
    assert abs(search.fit.eps_max / (exact["grad_sq_norm"] / exact["gHg"]) - 1) < TOLERANCE


def test_loss_changes_too_small_for_float32_are_measured_again_in_float64(monkeypatch):
    task = build_task("linreg")
    task.load("cpu")
    model = task.make_model()
    direct = ls.optimal_lr(ls.FixedPoint(model, task, dtype=torch.float64), 64, draws=300, n_boot=20)
    monkeypatch.setattr(ls.FixedPoint, "resolved", lambda self, changes: False)  # float32 never resolves
    again = ls.optimal_lr(ls.FixedPoint(model, task), 64, draws=300, n_boot=20)
    assert (direct.dtype, again.dtype) == ("float64", "float64")
    # the same batches; linreg's loss is quadratic, so the local model does not depend on the grid
    assert again.eps_opt == pytest.approx(direct.eps_opt, rel=1e-9)


def test_a_model_whose_loss_is_not_a_function_of_its_parameters_is_refused():
    task = build_task("digits", hidden=8, dropout=0.5)
    task.load("cpu")
    with pytest.raises(ls.LineSearchError, match="dropout"):
        ls.FixedPoint(task.make_model().train(), task)


# ---------------------------------------------------------------------------------------------
# The command line on a small sweep


@pytest.fixture(scope="module")
def linreg_sweep(tmp_path_factory) -> Path:
    """Two linreg runs written as sweeps.launch lays them out (SWEEP/runs/<run_name>/record.json),
    trained in this process: the records are what the analysis reads, whoever launched them."""
    sweep = tmp_path_factory.mktemp("line_search") / "sweep"
    for batch_size in (16, 64):
        config = RunConfig.from_dict({"task": {"name": "linreg"}, "batch_size": batch_size, "device": "cpu",
                                      "optimizer": {"lr": 0.5}, "goals": {"metric": "exact_excess_loss",
                                                                          "thresholds": [1.0, 0.3]}}).to_dict()
        train(config, records.run_dir(sweep, config))
    return sweep


def test_cli_writes_the_table_and_the_figure(linreg_sweep, tmp_path, capsys):
    out = tmp_path / "out"
    code = ls.main([str(linreg_sweep), "--goal", "0.3", "--batch-sizes", "8", "32", "128", "512",
                    "--draws", "300", "--bootstrap", "50", "--out", str(out)])
    said = capsys.readouterr()
    assert code == 0, said.err
    # progress on stderr while it works: each point, each batch size of its line search
    for words in ("[1/", "training it again to step", "B=8 (1/4)", "B=512 (4/4)", "Hessian-vector products"):
        assert words in said.err, said.err
    assert "B_noise by line search" in said.out and "B=8 (1/4)" not in said.out
    table = pd.read_csv(out / "line_search.csv")
    points = pd.read_csv(out / "line_search_points.csv")
    assert (out / "figures" / "line_search.png").stat().st_size > 10_000
    assert "B_noise by line search" in (out / "summary.md").read_text()
    assert set(table["goal"]) == {"exact_excess_loss<=0.3"}
    assert len(table) >= 1 and len(points) == 4 * len(table)
    assert (table["reference_source"] == "closed form (task.exact)").all()
    assert ((table["ratio_to_reference"] - 1).abs() < 0.3).all(), table
    # the other method at the same parameters: Hessian-vector products, unbiased within its error
    hvp_error = (table["b_noise_hvp"] - table["b_noise_reference"]).abs()
    assert (hvp_error < 4 * table["b_noise_hvp_se"]).all() and (table["hvp_draws"] == 400).all(), table
    assert (table["b_noise_hvp_se"] < 0.2 * table["b_noise_reference"]).all(), table
    # the parameters measured are those of the run where its record probed the goal: replayed exactly
    row = table.iloc[0]
    record = records.read_record(linreg_sweep / records.RUNS_DIR / row["run_name"] / records.RECORD_FILE)
    goal = next(g for g in record["goals"] if g["threshold"] == 0.3)
    assert row["step"] == goal["probed_at"]
    curve = record["curve"]
    logged = min(range(len(curve["step"])), key=lambda i: abs(curve["step"][i] - row["step"]))
    model, task = ls.parameters_at(record["config"], curve["step"][logged])
    assert math.isclose(task.exact(model.weight)["exact_excess_loss"], curve["exact_excess_loss"][logged],
                        rel_tol=1e-5)


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "no such sweep directory"),
    (["{empty}"], "no finished run records"),
    (["{sweep}", "--goal", "0.05"], "not a goal of this sweep"),
    (["{sweep}", "--batch-sizes", "0", "16", "64"], "must be > 0"),
    (["{sweep}", "--batch-sizes", "16", "64"], "at least 3 distinct"),
    (["{sweep}", "--hvp-draws", "3"], "--hvp-draws 3"),
])
def test_cli_refuses_bad_input(linreg_sweep, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "sweep": linreg_sweep}
    code = ls.main([a.format(**paths) for a in args] + ["--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "out").exists()
