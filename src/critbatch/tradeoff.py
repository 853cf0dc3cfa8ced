"""Steps to a goal, the best run per batch size, and the paper's steps/examples tradeoff fit.

Pure functions over tidy DataFrames: the `load_sweep` frame of docs/records.md, or any table
with columns goal, batch_size, steps (optional: reached, lr, seed, run_name, b_simple, task,
optimizer, goal_threshold). docs/analysis.md explains the choices made here.

The model (McCandlish et al. 2018, eq. 2.11): at a fixed goal, steps S and examples E = B*S obey
(S/S_min - 1)(E/E_min - 1) = 1, i.e. S(B) = S_min (1 + B_crit/B) with B_crit = E_min/S_min.
It is fitted, with its errors, in log space, as the paper does: the noise on a step count is
multiplicative (a few % from the evaluation grid, more from seeds and lr tuning).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import optimize, stats

#: the columns that name one tradeoff curve; a table may lack task and optimizer
GROUP_KEYS = ("sweep", "variant", "task", "optimizer", "goal")

MIN_BATCH_SIZES_FOR_FIT = 3   # two parameters: fewer distinct B leave no degrees of freedom
FEW_BATCH_SIZES = 5           # below this the fit rests on few points: say so
MIN_PER_SIDE = 2              # batch sizes wanted on each side of B_crit
POOR_FIT_RMS = 0.10           # rms residual of ln(steps) above which the hyperbola fits poorly
WIDE_INTERVAL = 10.0          # B_crit interval high/low ratio above which it is "wide"
MIN_FIT_STEPS = 20            # a point reached in fewer steps is resolved to worse than ~5 % (one step
                              # in 20, before seed noise): it is listed but not fitted
STEPS_MIN_LOG_SD = 0.01       # a step count is never known better than ~1 % (evaluation spacing)
NEGLIGIBLE_SHARE = 1e-3       # S_min or E_min/B below this share of S at every B: not measured
COARSE_LR_GRID = 1.45         # lr grids coarser than ~sqrt(2) around the best lr overstate its steps
_LOG_SPAN = 30.0              # search range of the log parameters below the data (a factor e^30)


def group_keys(df: pd.DataFrame) -> list[str]:
    """The GROUP_KEYS that `df` has: task and optimizer are optional in a plain table."""
    return [k for k in GROUP_KEYS if k in df.columns]


# ---------------------------------------------------------------------------------------------
# The fit


@dataclass
class TradeoffFit:
    """S(B) = s_min (1 + b_crit/B), fitted by least squares on ln S.

    `*_log_se` are standard errors of the natural log of each parameter (from the Jacobian;
    b_crit by the delta method); `*_ci` are (low, high) intervals at `level`, exp(ln x +- t*se)
    with a Student t of n-2 degrees of freedom. `*_boot_ci` are residual-bootstrap percentile
    intervals when asked for (NaN otherwise). When the fit is not identified (fewer than 3
    batch sizes, or the data pin a parameter to 0) the values are NaN and `message` says why.
    """

    s_min: float = math.nan
    e_min: float = math.nan
    b_crit: float = math.nan
    s_min_log_se: float = math.nan
    e_min_log_se: float = math.nan
    b_crit_log_se: float = math.nan
    s_min_ci: tuple[float, float] = (math.nan, math.nan)
    e_min_ci: tuple[float, float] = (math.nan, math.nan)
    b_crit_ci: tuple[float, float] = (math.nan, math.nan)
    s_min_boot_ci: tuple[float, float] = (math.nan, math.nan)
    e_min_boot_ci: tuple[float, float] = (math.nan, math.nan)
    b_crit_boot_ci: tuple[float, float] = (math.nan, math.nan)
    level: float = 0.95
    n_points: int = 0
    n_batch_sizes: int = 0
    dof: int = 0
    resid_rms: float = math.nan          # rms of ln(S) - ln(S_fit)
    residuals: tuple[float, ...] = ()    # ln(S) - ln(S_fit), in the input order
    batch_sizes: tuple[float, ...] = ()
    steps: tuple[float, ...] = ()
    identified: bool = False
    message: str = ""

    def predict_steps(self, batch_size) -> np.ndarray:
        b = np.asarray(batch_size, dtype=float)
        return self.s_min * (1.0 + self.b_crit / b)

    def predict_examples(self, batch_size) -> np.ndarray:
        return np.asarray(batch_size, dtype=float) * self.predict_steps(batch_size)

    def as_row(self) -> dict:
        """Flat values for a table row (intervals split into _low/_high)."""
        row = {"n_points": self.n_points, "n_batch_sizes": self.n_batch_sizes,
               "identified": self.identified}
        for name in ("s_min", "e_min", "b_crit"):
            row[name] = getattr(self, name)
            row[f"{name}_log_se"] = getattr(self, f"{name}_log_se")
            row[f"{name}_low"], row[f"{name}_high"] = getattr(self, f"{name}_ci")
        for name in ("s_min", "e_min", "b_crit"):
            row[f"{name}_boot_low"], row[f"{name}_boot_high"] = getattr(self, f"{name}_boot_ci")
        row.update(level=self.level, resid_rms=self.resid_rms, fit_message=self.message)
        return row


def _as_positive_array(values, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float).ravel()
    bad = ~np.isfinite(arr) | (arr <= 0)
    if bad.any():
        raise ValueError(f"{name} must be finite and > 0; got {arr[bad][:5].tolist()} "
                         f"at positions {np.flatnonzero(bad)[:5].tolist()}")
    return arr


def _model(theta: np.ndarray, inv_b: np.ndarray) -> np.ndarray:
    """ln(S_min + E_min/B) for theta = (ln S_min, ln E_min), computed without overflow."""
    return np.logaddexp(theta[0], theta[1] + np.log(inv_b))


def _jacobian(theta: np.ndarray, inv_b: np.ndarray) -> np.ndarray:
    """d model / d theta: the share of S_min and of E_min/B in S_fit."""
    w = 1.0 / (1.0 + np.exp(theta[0] - theta[1] - np.log(inv_b)))  # (E_min/B) / S_fit
    return np.column_stack([1.0 - w, w])


def _least_squares(log_s: np.ndarray, inv_b: np.ndarray, start: np.ndarray,
                   lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    start = np.clip(start, lower + 1e-6, upper - 1e-6)
    result = optimize.least_squares(
        lambda t: _model(t, inv_b) - log_s, start, jac=lambda t: _jacobian(t, inv_b),
        bounds=(lower, upper), method="trf", x_scale=1.0, xtol=1e-12, ftol=1e-12, gtol=1e-12)
    return result.x


def _start(steps: np.ndarray, inv_b: np.ndarray) -> np.ndarray:
    """S = S_min + E_min/B is linear in 1/B: a relative-error weighted linear fit starts us."""
    design = np.column_stack([np.ones_like(inv_b), inv_b]) / steps[:, None]
    coef, *_ = np.linalg.lstsq(design, np.ones_like(steps), rcond=None)
    s_min = coef[0] if coef[0] > 0 else 0.5 * steps.min()
    e_min = coef[1] if coef[1] > 0 else 0.5 * (steps / inv_b).min()
    return np.log([s_min, e_min])


def _interval(log_value: float, log_se: float, quantile: float) -> tuple[float, float]:
    if not np.isfinite(log_se):
        return (math.nan, math.nan)
    with np.errstate(over="ignore", under="ignore"):  # an unbounded interval is (0, inf): say so
        return (float(np.exp(log_value - quantile * log_se)), float(np.exp(log_value + quantile * log_se)))


def fit_tradeoff(batch_sizes, steps, level: float = 0.95, n_bootstrap: int = 0,
                 seed: int = 0, min_log_sd: float = 0.0) -> TradeoffFit:
    """Fit S(B) = S_min (1 + B_crit/B) to (batch size, steps-to-goal) points in log space.

    Args:
        batch_sizes, steps: one point per measurement; repeated batch sizes (e.g. seeds) are
            allowed, at least 3 distinct batch sizes are needed, steps must be > 0.
        level: confidence level of the intervals.
        n_bootstrap: > 0 adds residual-bootstrap percentile intervals (`*_boot_ci`).
        seed: the bootstrap's random seed.
        min_log_sd: a floor on the noise sd of ln(steps) for the errors: data measured on a grid
            (best lrs) can fit with no residual at all, which would claim an exact answer.

    Returns:
        A TradeoffFit: s_min, e_min, b_crit with their intervals, or NaN and a `message` saying
        why when the data do not identify them.

    >>> fit = fit_tradeoff([16, 64, 256, 1024], [1100.0, 350.0, 162.5, 115.6])
    >>> round(fit.s_min), round(fit.b_crit), fit.identified
    (100, 160, True)
    >>> fit_tradeoff([64, 128], [300.0, 200.0]).message
    'not identified: 2 batch size(s), the fit needs at least 3 (two parameters and a residual)'
    """
    b = _as_positive_array(batch_sizes, "batch_sizes")
    s = _as_positive_array(steps, "steps")
    if b.shape != s.shape:
        raise ValueError(f"batch_sizes and steps differ in length ({b.size} vs {s.size})")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1)")
    n, n_b = b.size, np.unique(b).size
    fit = TradeoffFit(level=level, n_points=n, n_batch_sizes=n_b, batch_sizes=tuple(b),
                      steps=tuple(s), dof=max(n - 2, 0))
    if n_b < MIN_BATCH_SIZES_FOR_FIT:
        fit.message = (f"not identified: {n_b} batch size(s), the fit needs at least "
                       f"{MIN_BATCH_SIZES_FOR_FIT} (two parameters and a residual)")
        return fit

    inv_b, log_s = 1.0 / b, np.log(s)
    # S_min <= S and E_min <= E at every B (up to noise); the lower bounds stand for "zero".
    upper = np.array([np.log(s.min()), np.log((s * b).min())]) + 1.0
    lower = upper - _LOG_SPAN
    theta = _least_squares(log_s, inv_b, _start(s, inv_b), lower, upper)
    resid = log_s - _model(theta, inv_b)
    fit.residuals = tuple(resid)
    fit.resid_rms = float(np.sqrt(np.mean(resid ** 2)))

    # a term that is a negligible share of S at every B is not measured: its parameter is ~0
    jac = _jacobian(theta, inv_b)
    pinned = (theta - lower < 1e-3 * _LOG_SPAN) | (jac.max(axis=0) < NEGLIGIBLE_SHARE)
    if pinned[0]:
        fit.message = ("not identified: steps fall as 1/B at every batch size (perfect scaling), "
                       "so B_crit is above the largest batch size: add larger batch sizes")
        return fit
    if pinned[1]:
        fit.message = ("not identified: steps do not fall with B (no benefit from larger batches), "
                       "so B_crit is below the smallest batch size: add smaller batch sizes")
        return fit

    sigma2 = max(float(resid @ resid) / fit.dof, min_log_sd ** 2)
    try:
        cov = sigma2 * np.linalg.inv(jac.T @ jac)
    except np.linalg.LinAlgError:
        cov = np.full((2, 2), np.inf)
    log_b = theta[1] - theta[0]
    var_log_b = cov[0, 0] + cov[1, 1] - 2.0 * cov[0, 1]
    ses = np.sqrt(np.maximum([cov[0, 0], cov[1, 1], var_log_b], 0.0))
    t = float(stats.t.ppf(0.5 + level / 2.0, fit.dof))
    fit.s_min, fit.e_min, fit.b_crit = (float(np.exp(v)) for v in (theta[0], theta[1], log_b))
    fit.s_min_log_se, fit.e_min_log_se, fit.b_crit_log_se = (float(v) for v in ses)
    fit.s_min_ci = _interval(theta[0], ses[0], t)
    fit.e_min_ci = _interval(theta[1], ses[1], t)
    fit.b_crit_ci = _interval(log_b, ses[2], t)
    fit.identified = True

    if n_bootstrap > 0:
        rng = np.random.default_rng(seed)
        fitted = log_s - resid
        scaled = resid * np.sqrt(n / fit.dof)   # residuals are shrunk by fitting 2 parameters
        boot = np.empty((n_bootstrap, 3))
        for i in range(n_bootstrap):
            th = _least_squares(fitted + rng.choice(scaled, n), inv_b, theta, lower, upper)
            boot[i] = th[0], th[1], th[1] - th[0]
        q = np.exp(np.quantile(boot, [0.5 - level / 2.0, 0.5 + level / 2.0], axis=0))
        fit.s_min_boot_ci, fit.e_min_boot_ci, fit.b_crit_boot_ci = (
            (float(q[0, j]), float(q[1, j])) for j in range(3))
    return fit


@dataclass
class LrFit:
    """Best lr against B: eps(B) = eps_max / (1 + b_noise/B) (paper eq. 2.6, SGD form).

    Unpacks as `eps_max, b_noise = fit_lr_curve(...)`. Intervals as in TradeoffFit.
    """

    eps_max: float = math.nan
    b_noise: float = math.nan
    eps_max_ci: tuple[float, float] = (math.nan, math.nan)
    b_noise_ci: tuple[float, float] = (math.nan, math.nan)
    eps_max_log_se: float = math.nan
    b_noise_log_se: float = math.nan
    n_points: int = 0
    resid_rms: float = math.nan
    identified: bool = False
    message: str = ""

    def __iter__(self):
        return iter((self.eps_max, self.b_noise))

    def predict_lr(self, batch_size) -> np.ndarray:
        return self.eps_max / (1.0 + self.b_noise / np.asarray(batch_size, dtype=float))


def fit_lr_curve(batch_sizes, lrs, level: float = 0.95, grid_factor: float | None = None) -> LrFit:
    """Fit eps(B) = eps_max/(1 + B_noise/B) in log space.

    1/eps = 1/eps_max + (B_noise/eps_max)/B has the form of S(B), so this is fit_tradeoff on
    1/lr: S_min <-> 1/eps_max and B_crit <-> B_noise. `grid_factor` (ratio of neighbouring lrs
    in the grid) sets a floor on the noise: a best lr is only known to within its grid cell,
    sd ln(factor)/sqrt(12).
    """
    lrs = _as_positive_array(lrs, "lrs")
    floor = math.log(grid_factor) / math.sqrt(12.0) if grid_factor and grid_factor > 1 else 0.0
    inner = fit_tradeoff(batch_sizes, 1.0 / lrs, level=level, min_log_sd=floor)
    fit = LrFit(n_points=inner.n_points, resid_rms=inner.resid_rms, identified=inner.identified,
                message=inner.message.replace("steps", "1/lr"))
    if inner.identified:
        fit.eps_max = 1.0 / inner.s_min
        fit.b_noise = inner.b_crit
        fit.eps_max_ci = (1.0 / inner.s_min_ci[1], 1.0 / inner.s_min_ci[0])
        fit.b_noise_ci = inner.b_crit_ci
        fit.eps_max_log_se, fit.b_noise_log_se = inner.s_min_log_se, inner.b_crit_log_se
    elif inner.message.startswith("not identified: steps fall"):
        fit.message = "not identified: best lr grows as B at every batch size, so B_noise is above the largest B"
    elif inner.message.startswith("not identified: steps do not"):
        fit.message = "not identified: best lr does not change with B, so B_noise is below the smallest B"
    return fit


# ---------------------------------------------------------------------------------------------
# From runs to the best run per (goal, batch size)


#: per-run values carried from the representative run of a (goal, B, lr) to the best-run table
NOISE_COLUMNS = ("b_simple_se", "grad_sq_norm", "grad_sq_norm_se", "trace_sigma", "trace_sigma_se", "noise_cov",
                 "b_simple_path", "b_simple_path_se", "b_simple_init", "b_simple_init_se")


def _reached_steps(df: pd.DataFrame) -> pd.Series:
    """Steps where the goal was reached, +inf otherwise (so a median over seeds can say 'no'), and
    0 where it was censored: met before its first valid measurement, faster than any measured."""
    steps = pd.to_numeric(df["steps"], errors="coerce").astype(float)
    reached = df["reached"].astype(bool) if "reached" in df.columns else steps.notna()
    censored = reached & df["censored"].astype(bool) if "censored" in df.columns else pd.Series(False, index=df.index)
    ok = reached & np.isfinite(steps) & (steps > 0)
    return steps.where(ok, np.inf).where(~censored, 0.0)


def steps_by_lr(df: pd.DataFrame) -> pd.DataFrame:
    """Per (goal, batch size, lr): steps to the goal, aggregated over seeds.

    `steps` is the median over seeds with unreached seeds counted as infinitely slow, so it is
    finite only when at least half of the seeds reached the goal; censored seeds (goal met before
    the first valid measurement) count as faster than any measured one, and a median that falls on
    them makes the setting `censored` (reached, steps unknown). `run_name` (and the noise-scale
    columns) come from the reached seed closest to that median, b_simple is the median over the
    reached seeds. Without an lr column each row is its own candidate (a plain table lists one
    row per tried setting).
    """
    keys = group_keys(df)
    work = df.copy()
    work["_steps"] = _reached_steps(work)
    if "lr" not in work.columns:
        work["lr"] = np.nan
        work["_cand"] = np.arange(len(work))
    else:
        work["_cand"] = work.groupby(keys + ["batch_size", "lr"], sort=False, dropna=False).ngroup()
    if "run_name" not in work.columns:
        work["run_name"] = [f"row{i}" for i in range(len(work))]
    if "b_simple" not in work.columns:
        work["b_simple"] = np.nan
    grouped = work.groupby("_cand", sort=False)
    work["_median"] = grouped["_steps"].transform("median")
    # the representative run: a reached seed, the one nearest the median (a censored one for a censored median)
    with np.errstate(divide="ignore", invalid="ignore"):
        distance = np.abs(np.log(work["_steps"]) - np.log(work["_median"]))
    both_censored = (work["_steps"] == 0) & (work["_median"] == 0)
    work["_dist"] = np.where(both_censored, 0.0, np.where(np.isfinite(distance), distance, np.inf))
    rep = work.sort_values(["_cand", "_dist", "run_name"]).drop_duplicates("_cand")
    carried = [c for c in ("run_id", "run_dir", *NOISE_COLUMNS) if c in work.columns]
    out = rep[keys + [c for c in ("goal_metric", "goal_threshold") if c in work.columns]
              + ["batch_size", "lr", "run_name"] + carried].copy()
    median = rep["_median"].to_numpy()
    out["steps"] = np.where(median > 0, median, np.nan)
    out["censored"] = median == 0
    out["n_seeds"] = grouped.size().reindex(rep["_cand"]).to_numpy()
    n_reached = np.isfinite(work["_steps"]).groupby(work["_cand"]).sum()
    out["n_reached"] = n_reached.reindex(rep["_cand"]).to_numpy()
    b_simple = work["b_simple"].where(np.isfinite(work["_steps"]) & (work["_steps"] > 0))
    out["b_simple"] = b_simple.groupby(work["_cand"]).median().reindex(rep["_cand"]).to_numpy()
    out["reached"] = np.isfinite(median)
    out.loc[~out["reached"], ["steps", "run_name"]] = [np.nan, None]
    out.loc[out["censored"], carried + ["b_simple"]] = np.nan
    out["examples"] = out["batch_size"] * out["steps"]
    return out.reset_index(drop=True)


def lr_grids(df: pd.DataFrame) -> pd.DataFrame:
    """The lrs tried at each (task, optimizer, batch size): n_lrs, lr_grid_min, lr_grid_max.

    Failed runs (crashes) are left out: they say nothing about how good their lr is.
    """
    keys = [k for k in group_keys(df) if k != "goal"]
    if "lr" not in df.columns:
        return pd.DataFrame(columns=keys + ["batch_size", "n_lrs", "lr_grid_min", "lr_grid_max"])
    tried = df if "status" not in df.columns else df[df["status"] != "failed"]
    tried = tried.dropna(subset=["lr"])
    grid = tried.groupby(keys + ["batch_size"], sort=False)["lr"].agg(
        n_lrs="nunique", lr_grid_min="min", lr_grid_max="max")
    return grid.reset_index()


def _edge(lr: float, lo: float, hi: float, n: int) -> str:
    if not np.isfinite(lr) or n == 0:
        return ""
    if n == 1:
        return "single"
    if np.isclose(lr, hi, rtol=1e-9):
        return "high"
    if np.isclose(lr, lo, rtol=1e-9):
        return "low"
    return ""


_EDGE_TEXT = {"single": "only one lr tried: the lr is not tuned",
              "high": "best lr is the largest tried: widen the grid upwards",
              "low": "best lr is the smallest tried: widen the grid downwards"}


def best_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Per (task, optimizer, goal, batch size): the lr that reached the goal in fewest steps.

    One row per (goal, batch size) that any run tried; `reached` is False where no lr reached the
    goal, `censored` True where the best lr met it before its first valid measurement (steps
    unknown: NaN). Columns: the group keys, batch_size, reached, censored, lr, steps, examples (= B * steps),
    run_name, b_simple, n_lrs, lr_grid_min, lr_grid_max, lr_at_grid_edge, lr_edge
    (single/low/high), n_tied (lrs sharing the fewest steps), n_seeds, on_front (not dominated
    in both steps and examples by another batch size) and warnings (semicolon-joined).

    Ties (steps are measured on a grid of evaluation steps) go to an lr inside the grid, then to
    the middle of the tied lrs, so a tie is not mistaken for an optimum at the edge.
    """
    _require(df, ["goal", "batch_size", "steps"])
    keys = group_keys(df)
    cand = steps_by_lr(df)
    grid = lr_grids(df)
    if len(grid):
        cand = cand.merge(grid, on=[k for k in keys if k != "goal"] + ["batch_size"], how="left")
    else:
        cand["n_lrs"], cand["lr_grid_min"], cand["lr_grid_max"] = 0, np.nan, np.nan
    cand["n_lrs"] = cand["n_lrs"].fillna(0).astype(int)
    cand["lr_edge"] = [_edge(*v) for v in zip(cand["lr"], cand["lr_grid_min"], cand["lr_grid_max"], cand["n_lrs"])]

    rows = []
    for _, group in cand.groupby(keys + ["batch_size"], sort=False):
        reached = group[group["reached"]]
        if reached.empty:
            row = group.iloc[0].copy()
            row[["lr", "steps", "examples", "b_simple"]] = np.nan
            row["run_name"], row["lr_edge"], row["n_tied"], row["censored"] = None, "", 0, False
            row["n_seeds"] = int(group["n_seeds"].max())
            for col in ("run_id", "run_dir"):
                if col in row.index:
                    row[col] = None
            rows.append(row)
            continue
        if reached["censored"].any():  # met before any measurement: faster than every measured lr
            row = reached[reached["censored"]].sort_values(["lr", "run_name"]).iloc[0].copy()
            row["n_tied"] = int(reached["censored"].sum())
            rows.append(row)
            continue
        tied = reached[np.isclose(reached["steps"], reached["steps"].min(), rtol=1e-9)]
        inner = tied[tied["lr_edge"] == ""]
        pool = (inner if len(inner) else tied).sort_values(["lr", "run_name"])
        row = pool.iloc[(len(pool) - 1) // 2].copy()
        row["n_tied"] = len(tied)
        rows.append(row)
    best = pd.DataFrame(rows).reset_index(drop=True)
    best["reached"] = best["reached"].astype(bool)
    best["censored"] = best["censored"].astype(bool)
    best["lr_at_grid_edge"] = best["lr_edge"] != ""
    best["on_front"] = _on_front(best, keys)
    best["warnings"] = [_run_warnings(r) for r in best.itertuples()]
    best = _sort_goals(best).drop(columns=["n_reached"], errors="ignore")
    first = keys + [c for c in ("goal_metric", "goal_threshold") if c in best.columns] + [
        "batch_size", "reached", "censored", "lr", "steps", "examples", "run_name", "b_simple", "n_lrs",
        "lr_grid_min", "lr_grid_max", "lr_at_grid_edge", "lr_edge", "n_tied", "n_seeds", "on_front"]
    rest = [c for c in best.columns if c not in first and c != "warnings"]
    return best[first + rest + ["warnings"]]


def _on_front(best: pd.DataFrame, keys: list[str]) -> np.ndarray:
    """True where no other batch size reached the goal in both fewer steps and fewer examples."""
    front = np.zeros(len(best), dtype=bool)
    for _, g in best[best["reached"] & ~best["censored"]].groupby(keys, sort=False):
        s, e = g["steps"].to_numpy(), g["examples"].to_numpy()
        dominated = ((s[None, :] <= s[:, None]) & (e[None, :] <= e[:, None])
                     & ((s[None, :] < s[:, None]) | (e[None, :] < e[:, None]))).any(axis=1)
        front[g.index.to_numpy()] = ~dominated
    return front


def _run_warnings(row) -> str:
    notes = []
    if not row.reached:
        notes.append("no lr reached this goal")
    elif row.censored:
        notes.append("met before the first valid measurement: steps unknown (censored)")
    elif row.lr_edge:
        notes.append(_EDGE_TEXT[row.lr_edge])
    if row.reached and row.n_seeds > 1 and row.n_reached < row.n_seeds:
        notes.append(f"{row.n_seeds - row.n_reached} of {row.n_seeds} seeds did not reach the goal")
    return "; ".join(notes)


def _sort_goals(df: pd.DataFrame) -> pd.DataFrame:
    """Easiest goal first (largest threshold), then batch size; plain tables keep their order."""
    keys = group_keys(df)
    work = df.copy()
    work["_goal_order"] = pd.factorize(work["goal"])[0]
    by = [k for k in keys if k != "goal"]
    if "goal_threshold" in work.columns and work["goal_threshold"].notna().all():
        work["_thr"] = -work["goal_threshold"]
        by += ["_thr"]
    by += ["_goal_order"] + (["batch_size"] if "batch_size" in work.columns else [])
    return work.sort_values(by, kind="stable").drop(columns=["_goal_order", "_thr"], errors="ignore").reset_index(drop=True)


def _require(df: pd.DataFrame, columns: list[str]) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"table lacks column(s) {missing}; it has {list(df.columns)}")


# ---------------------------------------------------------------------------------------------
# Per goal: the fit, the warnings, B_simple and the lr curve


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def fit_all_goals(best: pd.DataFrame, level: float = 0.95, n_bootstrap: int = 0,
                  runs: pd.DataFrame | None = None, min_steps: float = MIN_FIT_STEPS, seed: int = 0) -> pd.DataFrame:
    """One row per (task, optimizer, goal): the tradeoff fit on that goal's best runs, the noise
    scale there, the best-lr curve (B_noise) and the warnings a careful reader wants.

    Only best runs whose steps were measured (not censored) and number at least `min_steps` are
    fitted; the others are named in the warnings. With `runs` (the per-run frame the best runs
    came from) holding two or more seeds, `n_bootstrap` resamples the seeds of every (B, lr) and
    picks the best lr again each time: the `*_seed_low/high` intervals then hold the seed-to-seed
    noise and the winner's curse of picking the best lr. Otherwise `*_boot_low/high` are
    residual-bootstrap intervals of the fit alone.

    The noise scale at the goal (noise_scale_summary): B_simple over every run of the fitted
    best cells, its path average and its value at initialisation.
    """
    keys = group_keys(best)
    rows = []
    for key, g in best.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(keys, key))
        for col in ("goal_metric", "goal_threshold"):
            if col in g.columns:
                row[col] = g[col].iloc[0]
        censored = g["censored"].astype(bool) if "censored" in g.columns else pd.Series(False, index=g.index)
        measured = g[g["reached"] & ~censored].sort_values("batch_size")
        hit = measured[measured["steps"] >= min_steps]
        missed = g.loc[~g["reached"], "batch_size"].tolist()
        row["batch_sizes"] = " ".join(f"{b:g}" for b in hit["batch_size"])
        row["not_reached_at"] = " ".join(f"{b:g}" for b in missed)
        row["censored_at"] = " ".join(f"{b:g}" for b in g.loc[g["reached"] & censored, "batch_size"])
        row["too_few_steps_at"] = " ".join(f"{b:g}" for b in measured.loc[measured["steps"] < min_steps, "batch_size"])
        seeded = _seed_replicates(runs, row, hit) if runs is not None and n_bootstrap > 0 else None
        if len(hit):
            fit = fit_tradeoff(hit["batch_size"], hit["steps"], level=level,
                               n_bootstrap=n_bootstrap if seeded is None else 0, seed=seed,
                               min_log_sd=STEPS_MIN_LOG_SD)
        else:
            fit = TradeoffFit(level=level, message="no run reached this goal" if not len(measured)
                              else f"no best run took {min_steps:g} steps or more")
        row.update(fit.as_row())
        row.update(_seed_bootstrap(seeded, fit, n_bootstrap, level, seed))
        row.update(noise_scale_summary(best_cell_runs(runs, row, hit), seed=seed))
        grid_factor = _grid_factor(hit)
        lr_fit = _lr_fit_for(hit, level, grid_factor)
        row.update(lr_grid_factor=grid_factor, lr_eps_max=lr_fit.eps_max, lr_eps_max_low=lr_fit.eps_max_ci[0],
                   lr_eps_max_high=lr_fit.eps_max_ci[1], lr_b_noise=lr_fit.b_noise,
                   lr_b_noise_low=lr_fit.b_noise_ci[0], lr_b_noise_high=lr_fit.b_noise_ci[1],
                   lr_n_points=lr_fit.n_points, lr_resid_rms=lr_fit.resid_rms,
                   lr_fit_message=lr_fit.message)
        row["warnings"] = "; ".join(_goal_warnings(fit, hit, missed, lr_fit, row, min_steps))
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=keys + ["n_points", "b_crit", "warnings"])
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# Seeds as replicates: a bootstrap over seeds that repeats the choice of the best lr


def _seed_replicates(runs: pd.DataFrame, row: dict, hit: pd.DataFrame):
    """For the fitted batch sizes of one goal: steps per (B, lr, seed) as an array [B, lr, seed]
    (inf: not reached, 0: censored, NaN: no such run), or None with fewer than two seeds."""
    if "seed" not in runs.columns or "lr" not in runs.columns or hit.empty:
        return None
    sel = runs
    for k in [k for k in GROUP_KEYS if k in row and k in runs.columns]:
        sel = sel[sel[k] == row[k]]
    sel = sel[sel["batch_size"].isin(hit["batch_size"])]
    if "status" in sel.columns:
        sel = sel[sel["status"] != "failed"]
    if sel["seed"].nunique() < 2:
        return None
    sel = sel.assign(_steps=_reached_steps(sel))
    batch_sizes = np.sort(hit["batch_size"].unique())
    lrs, seeds = np.sort(sel["lr"].unique()), np.sort(sel["seed"].unique())
    cube = np.full((len(batch_sizes), len(lrs), len(seeds)), np.nan)
    cube[np.searchsorted(batch_sizes, sel["batch_size"]), np.searchsorted(lrs, sel["lr"]),
         np.searchsorted(seeds, sel["seed"])] = sel["_steps"].to_numpy()
    return batch_sizes, cube


def _seed_bootstrap(seeded, fit: TradeoffFit, n_bootstrap: int, level: float, seed: int) -> dict:
    """Percentile intervals of S_min, E_min and B_crit over resamples of the seeds in every
    (B, lr) cell, the best lr chosen again in each resample."""
    out = {f"{name}_seed_{side}": math.nan for name in ("s_min", "e_min", "b_crit") for side in ("low", "high")}
    out["n_seed_resamples"] = 0
    if seeded is None or not fit.identified or n_bootstrap <= 0:
        return out
    batch_sizes, cube = seeded
    rng = np.random.default_rng(seed)
    n_seeds = cube.shape[-1]
    present = np.take_along_axis(cube, np.argsort(np.isnan(cube), axis=-1, kind="stable"), axis=-1)  # runs first
    counts = (~np.isnan(cube)).sum(-1)
    unused = np.arange(n_seeds) >= counts[..., None]  # a cell resamples as many runs as it has
    estimates = []
    for _ in range(n_bootstrap):
        pick = (rng.random(cube.shape) * np.maximum(counts, 1)[..., None]).astype(int)
        draw = np.where(unused, np.nan, np.take_along_axis(present, pick, axis=-1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # cells without runs give NaN
            best = np.nanmin(np.nanmedian(draw, axis=-1), axis=1)
        ok = np.isfinite(best) & (best > 0)  # reached, and not censored, in this resample
        if ok.sum() < MIN_BATCH_SIZES_FOR_FIT:
            continue
        refit = fit_tradeoff(batch_sizes[ok], best[ok], level=level)
        if refit.identified:
            estimates.append(np.log([refit.s_min, refit.e_min, refit.b_crit]))
    if len(estimates) < max(10, n_bootstrap // 2):
        return out
    q = np.exp(np.quantile(np.array(estimates), [0.5 - level / 2, 0.5 + level / 2], axis=0))
    for j, name in enumerate(("s_min", "e_min", "b_crit")):
        out[f"{name}_seed_low"], out[f"{name}_seed_high"] = float(q[0, j]), float(q[1, j])
    out["n_seed_resamples"] = len(estimates)
    return out


# ---------------------------------------------------------------------------------------------
# The noise scale at a goal


def best_cell_runs(runs: pd.DataFrame | None, row: dict, hit: pd.DataFrame) -> pd.DataFrame:
    """Every run (all seeds) of the best (B, lr) cells in `hit` that measured the goal: the runs
    whose noise scale at the goal is summarised. Without `runs`, the best-run rows themselves."""
    if runs is None or "lr" not in runs.columns or hit.empty:
        return hit
    sel = runs[runs["goal"] == row["goal"]] if "goal" in row else runs
    for k in [k for k in GROUP_KEYS if k in row and k != "goal" and k in runs.columns]:
        sel = sel[sel[k] == row[k]]
    cells = pd.MultiIndex.from_frame(hit[["batch_size", "lr"]])
    sel = sel[pd.MultiIndex.from_frame(sel[["batch_size", "lr"]]).isin(cells)]
    measured = sel["reached"].astype(bool) & pd.to_numeric(sel["steps"], errors="coerce").gt(0)
    if "censored" in sel.columns:
        measured &= ~sel["censored"].astype(bool)
    return sel[measured] if measured.any() else hit


def noise_scale_summary(rows: pd.DataFrame, n_bootstrap: int = 400, seed: int = 0) -> dict:
    """The noise scales at a goal from the runs that reached it best (one row per run, all seeds of
    the best lr at each batch size): `b_simple_*` (tr(Sigma)/|G|^2) and, where measured,
    `b_noise_*` (tr(H Sigma)/G^T H G), each from _median_noise_scale."""
    out = _median_noise_scale(rows, "b_simple", "grad_sq_norm", "trace_sigma", n_bootstrap, seed, "noise_updates")
    out.update(_median_noise_scale(rows, "b_noise", "grad_h_grad", "trace_h_sigma", n_bootstrap, seed,
                                   "curvature_updates"))
    return out


# A noise scale at a goal from fewer measurements than this is not counted: its standard error,
# from so few, says nothing, and keeping only the ones that look resolved keeps the ones whose
# denominator happened to come out large (docs/noise_scales.md).
MIN_NOISE_UPDATES = 8


# A path average counts at a goal only when its standard error is at most this share of it (a
# rough one, e.g. B_noise's at the default measuring interval, is left out, not averaged in).
MAX_PATH_RELATIVE_SE = 0.25


def _median_noise_scale(rows: pd.DataFrame, name: str, denominator: str, numerator: str,
                        n_bootstrap: int, seed: int, updates: str | None = None) -> dict:
    """For the noise scale `name` = numerator / denominator (e.g. B_simple = tr(Sigma)/|G|^2):

    - `name`: the median over the runs of their value at the goal (each measured at the
      parameters that crossed it), with a 95% bootstrap interval over the runs (`name_low/high`).
      A run whose denominator is not resolved (below twice its standard error) is not dropped: it
      counts with its lower bound numerator/(denominator + 2 se); if the median rests on such a
      bound, `name_resolved` is False and the median is itself a lower bound.
    - `name_path`: the median over the runs of the noise scale averaged along the path to the goal
      (what S = S_min + E_min/B integrates, to be compared with B_crit). Where the runs give its
      standard error (`name_path_se`), only those resolved to MAX_PATH_RELATIVE_SE count.
    - `name_init`: the median over the runs of its value at initialisation.
    Rows without standard errors (a plain table) count as resolved. A value from fewer than
    MIN_NOISE_UPDATES measurements (`updates`: the column that counts them) is not counted.
    """
    out = {name: math.nan, f"{name}_low": math.nan, f"{name}_high": math.nan, f"{name}_resolved": False,
           f"{name}_n": 0, f"{name}_unresolved_runs": 0, f"{name}_min": math.nan, f"{name}_max": math.nan,
           f"{name}_batch_sizes": "", f"{name}_runs": "", f"{name}_path": math.nan,
           f"{name}_path_min": math.nan, f"{name}_path_max": math.nan, f"{name}_init": math.nan}
    if rows.empty:
        return out
    col = {c: pd.to_numeric(rows[c], errors="coerce").to_numpy(dtype=float) if c in rows.columns
           else np.full(len(rows), np.nan) for c in (name, denominator, f"{denominator}_se", numerator,
                                                     f"{name}_path", f"{name}_path_se", f"{name}_init")}
    g, g_se, t = col[denominator], col[f"{denominator}_se"], col[numerator]
    has_se = np.isfinite(g) & np.isfinite(g_se) & np.isfinite(t)
    resolved = np.where(has_se, g > 2 * g_se, np.isfinite(col[name]) & (col[name] > 0))
    with np.errstate(divide="ignore", invalid="ignore"):
        lower = np.where(has_se & (g + 2 * g_se > 0), t / (g + 2 * g_se), np.nan)
    value = np.where(resolved, col[name], lower)  # an unresolved run: its lower bound
    if updates in rows.columns:  # a count that is not known (a table without it) does not drop the value
        count = pd.to_numeric(rows[updates], errors="coerce").to_numpy(dtype=float)
        value = np.where(np.isfinite(count) & (count < MIN_NOISE_UPDATES), np.nan, value)
    counted = np.isfinite(value) & (value > 0)
    if counted.any():
        values, is_bound = value[counted], ~resolved[counted]
        median = float(np.median(values))
        out[name] = median
        # the median is a measurement only if no lower bound sits at or below it
        out[f"{name}_resolved"] = not bool((is_bound & (values <= median)).any())
        out[f"{name}_unresolved_runs"] = int(is_bound.sum())
        boot = np.median(np.random.default_rng(seed).choice(values, (n_bootstrap, values.size)), axis=1)
        out[f"{name}_low"], out[f"{name}_high"] = (float(q) for q in np.quantile(boot, [0.025, 0.975]))
        out[f"{name}_min"], out[f"{name}_max"] = float(values.min()), float(values.max())
    out[f"{name}_n"] = int(counted.sum())
    out[f"{name}_batch_sizes"] = " ".join(f"{b:g}" for b in sorted(set(rows["batch_size"].to_numpy()[counted])))
    if "run_name" in rows.columns:
        out[f"{name}_runs"] = ";".join(str(r) for r in rows["run_name"].to_numpy()[counted])
    path, path_se = col[f"{name}_path"], col[f"{name}_path_se"]
    keep = np.isfinite(path) & (path > 0)
    if f"{name}_path_se" in rows.columns:
        keep &= path_se <= MAX_PATH_RELATIVE_SE * path
    path = path[keep]
    if path.size:
        out[f"{name}_path"] = float(np.median(path))
        out[f"{name}_path_min"], out[f"{name}_path_max"] = float(path.min()), float(path.max())
    init = col[f"{name}_init"][np.isfinite(col[f"{name}_init"])]
    if init.size:
        out[f"{name}_init"] = float(np.median(init))
    return out


def _grid_factor(hit: pd.DataFrame) -> float:
    """Median ratio of neighbouring lrs in the grids at these batch sizes (NaN if unknown)."""
    if not {"lr_grid_min", "lr_grid_max", "n_lrs"} <= set(hit.columns):
        return math.nan
    g = hit[hit["n_lrs"] > 1]
    if g.empty:
        return math.nan
    return float(np.median((g["lr_grid_max"] / g["lr_grid_min"]) ** (1.0 / (g["n_lrs"] - 1))))


def _lr_fit_for(hit: pd.DataFrame, level: float, grid_factor: float) -> LrFit:
    if "lr" not in hit.columns or hit["lr"].isna().all():
        return LrFit(message="no lr column")
    usable = hit.dropna(subset=["lr"])
    if "n_lrs" in usable.columns:
        usable = usable[usable["n_lrs"] > 1]   # an lr that was not tuned says nothing about eps(B)
        if usable["batch_size"].nunique() < MIN_BATCH_SIZES_FOR_FIT:
            return LrFit(n_points=len(usable), message=f"lr tuned (more than one lr tried) at only "
                         f"{usable['batch_size'].nunique()} batch size(s): no lr fit")
    return fit_lr_curve(usable["batch_size"], usable["lr"], level=level,
                        grid_factor=grid_factor if np.isfinite(grid_factor) else None)


def _goal_warnings(fit: TradeoffFit, hit: pd.DataFrame, missed: list, lr_fit: LrFit, row: dict,
                   min_steps: float) -> list[str]:
    notes = []
    if row.get("censored_at"):
        notes.append(f"met before the first valid measurement at B={row['censored_at'].replace(' ', ',')}: "
                     "steps unknown (censored), not fitted (harder goals or a smaller smoothing.min_examples "
                     "resolve them)")
    if row.get("too_few_steps_at"):
        notes.append(f"reached in fewer than {min_steps:g} steps at B={row['too_few_steps_at'].replace(' ', ',')}: "
                     "not fitted (resolved to worse than 5%: prefer harder goals)")
    n_b = hit["batch_size"].nunique()
    if n_b == 0:
        return notes + ["no run reached this goal: raise the budget or drop the goal" if not row.get("censored_at")
                        and not row.get("too_few_steps_at") else "no point to fit"]
    if n_b < FEW_BATCH_SIZES:
        notes.append(f"fitted on only {n_b} batch size(s): "
                     + (f"no fit (it needs at least {MIN_BATCH_SIZES_FOR_FIT})" if n_b < MIN_BATCH_SIZES_FOR_FIT
                        else "the fit rests on few points"))
    if missed:
        notes.append("not reached at B=" + ",".join(f"{b:g}" for b in missed))
    if fit.message and n_b >= MIN_BATCH_SIZES_FOR_FIT:
        notes.append(fit.message)
    if fit.identified:
        bs = hit["batch_size"].to_numpy(dtype=float)
        below, above = int((bs < fit.b_crit).sum()), int((bs > fit.b_crit).sum())
        if below < MIN_PER_SIDE:
            notes.append(f"only {below} batch size(s) below B_crit={_fmt(fit.b_crit)}: "
                         "S_min-side extrapolated, add smaller batch sizes")
        if above < MIN_PER_SIDE:
            notes.append(f"only {above} batch size(s) above B_crit={_fmt(fit.b_crit)}: "
                         "add larger batch sizes")
        if fit.resid_rms > POOR_FIT_RMS:
            worst = int(np.argmax(np.abs(fit.residuals)))
            notes.append(f"poor fit: rms residual {fit.resid_rms:.2f} in ln(steps) "
                         f"(worst at B={fit.batch_sizes[worst]:g}, {fit.residuals[worst]:+.2f})")
        lo, hi = fit.b_crit_ci
        if np.isfinite(lo) and hi / lo > WIDE_INTERVAL:
            notes.append(f"B_crit interval is wide ({_fmt(lo)}..{_fmt(hi)})")
    if row.get("b_simple_n") and not row.get("b_simple_resolved"):
        notes.append(f"|G|^2 not resolved at this goal in {row['b_simple_unresolved_runs']} of {row['b_simple_n']} "
                     f"runs: B_simple is at least {_fmt(row['b_simple'])} (probe longer: noise_scale.probe_batches)")
    elif hit.shape[0] and not row.get("b_simple_n") and "b_simple" in hit.columns:
        notes.append("no best run measured B_simple at this goal")
    grid_factor = row.get("lr_grid_factor", math.nan)
    if np.isfinite(grid_factor) and grid_factor > COARSE_LR_GRID:
        notes.append(f"lr grid a factor {grid_factor:.2g} apart: the best lr's steps overstate S by up to "
                     f"tens of % (use a grid at most {COARSE_LR_GRID:.3g} apart around the best lr)")
    if lr_fit.identified and {"lr_grid_min"} <= set(hit.columns):
        position = (hit["lr"] / hit["lr_grid_min"]).to_numpy(dtype=float)
        if len(position) >= MIN_BATCH_SIZES_FOR_FIT and np.allclose(position, position[0], rtol=1e-3):
            notes.append("best lr sits at the same place in its grid at every B: the lr fit (B_noise) "
                         "only reproduces how the grid was centred")
    if "lr_edge" in hit.columns:
        for edge in ("high", "low", "single"):
            at = hit.loc[hit["lr_edge"] == edge, "batch_size"]
            if len(at):
                notes.append(f"{_EDGE_TEXT[edge]} at B=" + ",".join(f"{b:g}" for b in at))
    return notes
