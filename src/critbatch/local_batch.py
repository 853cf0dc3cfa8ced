"""The local critical batch (Merrill et al. 2025) from branch runs: pure functions over their records.

A branch sweep (sweeps.branch) holds one trunk run and, from each of its saved states (a branch
point), branch runs at k times its batch size B0, several lrs and seeds, each trained for the same
window of examples (critbatch.branches). At a branch point, for each multiplier k the lr whose
loss after the window is lowest on average over the seeds is taken; the local critical batch is
the largest k B0 whose branches lose at most a share `tolerance` of the progress that the k = 1
branch made over the window: L_k - L_1 <= tolerance (L_start - L_1),
L_start the trunk's loss at the branch point. (A share of the progress rather than of the loss,
so that a loss's floor, which no batch size moves, does not make the test lenient.) Its interval
comes from resampling the seeds of every (k, lr) and choosing the lrs again (a bootstrap).

`load_branch_sweep` reads a sweep directory into the trunk's record and a frame of branches;
`local_critical_batches` gives one row per branch point; `cost` what each way of measuring the
critical batch spent in examples.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from critbatch import records


def load_branch_sweep(sweep_dir: str | Path) -> tuple[dict, pd.DataFrame]:
    """(the trunk's record, one row per finished branch record) of a branch sweep directory.
    Columns: run_name, status, trunk_step, examples (the trunk's, at the branch point), label,
    start_loss, multiplier, batch_size, lr, seed, loss (after the window; inf where the branch
    diverged or its loss is not finite), branch_examples, wall_time. Raises FileNotFoundError or
    ValueError saying what is missing."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir}: no such sweep directory")
    trunk, rows = None, []
    for path in records.iter_record_paths(sweep_dir):
        try:
            record = records.read_record(path)
        except records.RecordError:
            continue  # unreadable: sweeps.status lists it, a relaunch reruns it
        if not records.Status(record["status"]).finished:
            continue
        branch = record["config"].get("branch")
        if branch is None:
            if record["summary"].get("branch_states"):
                trunk = record
            continue
        summary = record["summary"]
        loss = summary.get("branch_loss")
        rows.append({"run_name": record["run_name"], "status": record["status"], "trunk": branch["trunk"],
                     "trunk_step": branch["trunk_step"], "multiplier": branch["multiplier"],
                     "batch_size": record["config"]["batch_size"], "lr": record["config"]["optimizer"]["lr"],
                     "seed": record["config"]["seed"], "start_loss": summary.get("branch_start_loss"),
                     "loss": math.inf if loss is None or record["status"] == records.FAILED else float(loss),
                     "branch_examples": summary.get("examples"), "wall_time": summary.get("wall_time")})
    if trunk is None:
        raise ValueError(f"{sweep_dir}: no finished trunk run (a record with summary.branch_states); is this the "
                         "directory of python -m sweeps.branch, and is its trunk done?")
    frame = pd.DataFrame(rows, columns=["run_name", "status", "trunk", "trunk_step", "multiplier", "batch_size", "lr",
                                        "seed", "start_loss", "loss", "branch_examples", "wall_time"])
    frame = frame[frame["trunk"] == trunk["run_name"]].drop(columns="trunk")
    B0 = trunk["config"]["batch_size"]
    points = {s["step"]: s for s in trunk["summary"]["branch_states"]}
    frame["examples"] = frame["trunk_step"] * B0
    frame["label"] = frame["trunk_step"].map(lambda step: points.get(step, {}).get("label", ""))
    return trunk, frame.reset_index(drop=True)


def _within(losses: dict[int, np.ndarray], start_loss: float, tolerance: float) -> np.ndarray:
    """The largest multiplier k whose loss is at most the k = 1 loss plus `tolerance` x the k = 1
    branch's progress from `start_loss` (the smallest multiplier stands for k = 1); `losses`: per
    multiplier, one loss per resample (an array), so all resamples are judged at once. Any k, not
    only the first ones in a row: one noisy small multiplier must not decide it."""
    ks = sorted(losses)
    reference = losses[ks[0]]
    allowed = reference + tolerance * (start_loss - reference)
    largest = np.full(np.shape(reference), ks[0])
    for k in ks[1:]:
        largest = np.where(losses[k] <= allowed, k, largest)
    return largest


def _best_lr_means(cells: dict[tuple[int, float], np.ndarray]) -> dict[int, np.ndarray]:
    """Per multiplier, the lowest mean loss over its lrs (a diverged seed makes a mean inf); each
    cell's losses are [..., seeds] and the mean is over the last axis."""
    best: dict[int, np.ndarray] = {}
    for (k, _), losses in cells.items():
        with np.errstate(invalid="ignore"):
            mean = np.mean(losses, axis=-1)
        mean = np.where(np.isnan(mean), np.inf, mean)
        best[k] = np.minimum(best[k], mean) if k in best else mean
    return best


def local_critical_batch(point: pd.DataFrame, trunk_batch_size: int, tolerance: float, n_bootstrap: int = 1000,
                         level: float = 0.95, seed: int = 0) -> dict:
    """The local critical batch at one branch point from its branches (rows of load_branch_sweep's
    frame, all from one start_loss): the value, its bootstrap interval over the seeds (`low`,
    `high`: percentiles of `level`), `saturated` (the largest multiplier stays within the
    tolerance: it is at least the largest batch tried), `floor` (no larger multiplier does: at most
    B0), the best lr per multiplier and the mean losses (`losses`, `lrs`: multiplier -> value)."""
    cells = {key: group["loss"].to_numpy(dtype=float)
             for key, group in point.groupby(["multiplier", "lr"], sort=True)}
    best = {k: float(v) for k, v in _best_lr_means(cells).items()}
    if not best or min(best) != 1:
        return {"b_local": math.nan, "low": math.nan, "high": math.nan, "saturated": False, "floor": False,
                "losses": best, "lrs": {}, "n_seeds": 0}
    start = float(point["start_loss"].dropna().iloc[0]) if point["start_loss"].notna().any() else math.nan
    k = int(_within(best, start, tolerance))
    rng = np.random.default_rng(seed)
    resampled = {key: losses[rng.integers(len(losses), size=(n_bootstrap, len(losses)))]
                 for key, losses in cells.items()}
    multipliers = _within(_best_lr_means(resampled), start, tolerance)
    low, high = (np.quantile(np.log2(multipliers), [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
                 if n_bootstrap else (np.nan,) * 2)
    lrs = {m: min((lr for (kk, lr) in cells if kk == m), key=lambda lr, m=m: np.mean(cells[(m, lr)])) for m in best}
    return {"b_local": k * trunk_batch_size, "low": trunk_batch_size * 2.0 ** low,
            "high": trunk_batch_size * 2.0 ** high, "saturated": k == max(best), "floor": k == min(best),
            "losses": best, "lrs": lrs, "n_seeds": int(point["seed"].nunique())}


def local_critical_batches(frame: pd.DataFrame, trunk_batch_size: int, tolerance: float, n_bootstrap: int = 1000,
                           level: float = 0.95) -> pd.DataFrame:
    """One row per branch point: trunk_step, examples, label, start_loss, b_local, low, high,
    saturated, floor, n_seeds, n_branches, branch_examples (what its branches trained on) and
    the mean loss of the best lr at each multiplier (loss_k<k>)."""
    rows = []
    for step, point in frame.groupby("trunk_step", sort=True):
        result = local_critical_batch(point, trunk_batch_size, tolerance, n_bootstrap, level)
        rows.append({"trunk_step": step, "examples": int(point["examples"].iloc[0]), "label": point["label"].iloc[0],
                     "start_loss": point["start_loss"].dropna().median() if point["start_loss"].notna().any()
                     else math.nan, **{key: result[key] for key in ("b_local", "low", "high", "saturated", "floor",
                                                                   "n_seeds")},
                     "n_branches": len(point), "branch_examples": int(point["branch_examples"].fillna(0).sum()),
                     **{f"loss_k{k}": v for k, v in sorted(result["losses"].items())},
                     **{f"lr_k{k}": v for k, v in sorted(result["lrs"].items())}})
    return pd.DataFrame(rows)


def noise_scale_examples(trunk: dict) -> dict[str, int]:
    """What the trunk's noise scales cost in examples beyond its training batches: the probes (at
    initialisation and at the goals, max(B, probe_batch_size) examples a batch) and B_noise's
    batches of its own (hessian_draws x max(k, 3) micro-batches of hessian_micro_batch, at each
    measurement). B_simple along the path uses the training batches themselves."""
    config, summary = trunk["config"], trunk["summary"]
    ns = config["noise_scale"]
    probe_size = max(config["batch_size"], ns["probe_batch_size"])
    probes = (summary.get("noise_init_batches") or 0) + sum(goal.get("noise_updates") or 0 for goal in trunk["goals"]
                                                          if goal.get("noise_source") == "probe")
    k = summary.get("noise_micro_batches") or 1
    own = 0
    if ns.get("hessian_micro_batch") and ns.get("hessian_every"):
        own = (summary.get("curvature_measurements") or 0) * ns["hessian_draws"] * max(k, 3) * ns["hessian_micro_batch"]
    return {"probes": probes * probe_size, "b_noise_batches": own}


def trunk_at(trunk: dict, steps, column: str) -> np.ndarray:
    """A trunk curve column interpolated (in log steps where positive) at `steps`."""
    curve = trunk["curve"]
    x = np.asarray(curve["step"], dtype=float)
    y = np.array([np.nan if v is None else v for v in curve.get(column, [None] * len(x))], dtype=float)
    ok = np.isfinite(y) & (x > 0)
    steps = np.asarray(steps, dtype=float)
    if ok.sum() < 2:
        return np.full(steps.shape, np.nan)
    out = np.interp(np.log(np.maximum(steps, 1)), np.log(x[ok]), y[ok], left=np.nan, right=np.nan)
    return np.where(steps > 0, out, np.nan)
