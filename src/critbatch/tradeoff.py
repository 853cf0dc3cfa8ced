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
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import optimize, stats

#: the columns that name one tradeoff curve; a table may lack task and optimizer
GROUP_KEYS = ("task", "optimizer", "goal")

MIN_BATCH_SIZES_FOR_FIT = 3   # two parameters: fewer distinct B leave no degrees of freedom
FEW_BATCH_SIZES = 5           # below this the fit rests on few points: say so
MIN_PER_SIDE = 2              # batch sizes wanted on each side of B_crit
POOR_FIT_RMS = 0.10           # rms residual of ln(steps) above which the hyperbola fits poorly
WIDE_INTERVAL = 10.0          # B_crit interval high/low ratio above which it is "wide"
MIN_RESOLVED_STEPS = 10       # fewer steps to a goal are resolved to no better than ~10 %
STEPS_MIN_LOG_SD = 0.01       # a step count is never known better than ~1 % (evaluation spacing)
NEGLIGIBLE_SHARE = 1e-3       # S_min or E_min/B below this share of S at every B: not measured
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

    Repeated batch sizes (e.g. seeds) are allowed; at least 3 distinct batch sizes are needed.
    `n_bootstrap` > 0 adds residual-bootstrap percentile intervals. `min_log_sd` is a floor on
    the noise sd of ln(steps) for the errors: data measured on a grid (best lrs) can fit with no
    residual at all, which would claim an exact answer.
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


def _reached_steps(df: pd.DataFrame) -> pd.Series:
    """Steps where the goal was reached, +inf otherwise (so a median over seeds can say 'no')."""
    steps = pd.to_numeric(df["steps"], errors="coerce").astype(float)
    reached = df["reached"].astype(bool) if "reached" in df.columns else steps.notna()
    ok = reached & np.isfinite(steps) & (steps > 0)
    return steps.where(ok, np.inf)


def steps_by_lr(df: pd.DataFrame) -> pd.DataFrame:
    """Per (goal, batch size, lr): steps to the goal, aggregated over seeds.

    `steps` is the median over seeds with unreached seeds counted as infinitely slow, so it is
    finite only when at least half of the seeds reached the goal; `run_name` (and b_simple) come
    from the reached seed closest to that median. Without an lr column each row is its own
    candidate (a plain table lists one row per tried setting).
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
    # the representative run: a reached seed, the one nearest the median
    work["_dist"] = np.where(np.isfinite(work["_steps"]),
                             np.abs(np.log(work["_steps"]) - np.log(work["_median"])), np.inf)
    rep = work.sort_values(["_cand", "_dist", "run_name"]).drop_duplicates("_cand")
    out = rep[keys + [c for c in ("goal_metric", "goal_threshold") if c in work.columns]
              + ["batch_size", "lr", "run_name"]
              + [c for c in ("run_id", "run_dir") if c in work.columns]].copy()
    out["steps"] = rep["_median"].to_numpy()
    out["n_seeds"] = grouped.size().reindex(rep["_cand"]).to_numpy()
    n_reached = np.isfinite(work["_steps"]).groupby(work["_cand"]).sum()
    out["n_reached"] = n_reached.reindex(rep["_cand"]).to_numpy()
    b_simple = work["b_simple"].where(np.isfinite(work["_steps"]))
    out["b_simple"] = b_simple.groupby(work["_cand"]).median().reindex(rep["_cand"]).to_numpy()
    out["reached"] = np.isfinite(out["steps"])
    out.loc[~out["reached"], ["steps", "run_name"]] = [np.nan, None]
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
    goal. Columns: the group keys, batch_size, reached, lr, steps, examples (= B * steps),
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
            row["run_name"], row["lr_edge"], row["n_tied"] = None, "", 0
            row["n_seeds"] = int(group["n_seeds"].max())
            for col in ("run_id", "run_dir"):
                if col in row.index:
                    row[col] = None
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
    best["lr_at_grid_edge"] = best["lr_edge"] != ""
    best["on_front"] = _on_front(best, keys)
    best["warnings"] = [_run_warnings(r) for r in best.itertuples()]
    best = _sort_goals(best).drop(columns=["n_reached"], errors="ignore")
    first = keys + [c for c in ("goal_metric", "goal_threshold") if c in best.columns] + [
        "batch_size", "reached", "lr", "steps", "examples", "run_name", "b_simple", "n_lrs",
        "lr_grid_min", "lr_grid_max", "lr_at_grid_edge", "lr_edge", "n_tied", "n_seeds", "on_front"]
    rest = [c for c in best.columns if c not in first and c != "warnings"]
    return best[first + rest + ["warnings"]]


def _on_front(best: pd.DataFrame, keys: list[str]) -> np.ndarray:
    """True where no other batch size reached the goal in both fewer steps and fewer examples."""
    front = np.zeros(len(best), dtype=bool)
    for _, g in best[best["reached"]].groupby(keys, sort=False):
        s, e = g["steps"].to_numpy(), g["examples"].to_numpy()
        dominated = ((s[None, :] <= s[:, None]) & (e[None, :] <= e[:, None])
                     & ((s[None, :] < s[:, None]) | (e[None, :] < e[:, None]))).any(axis=1)
        front[g.index.to_numpy()] = ~dominated
    return front


def _run_warnings(row) -> str:
    notes = []
    if not row.reached:
        notes.append("no lr reached this goal")
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


def fit_all_goals(best: pd.DataFrame, level: float = 0.95, n_bootstrap: int = 0) -> pd.DataFrame:
    """One row per (task, optimizer, goal): the tradeoff fit on that goal's best runs, B_simple
    from those runs, the best-lr curve (B_noise) and the warnings a careful reader wants.

    B_simple is the median over the best runs (the well-tuned lr at each B) that measured it;
    `b_simple_batch_sizes` / `b_simple_runs` say which runs those were.
    """
    keys = group_keys(best)
    rows = []
    for key, g in best.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(keys, key))
        for col in ("goal_metric", "goal_threshold"):
            if col in g.columns:
                row[col] = g[col].iloc[0]
        hit = g[g["reached"]].sort_values("batch_size")
        missed = g.loc[~g["reached"], "batch_size"].tolist()
        row["batch_sizes"] = " ".join(f"{b:g}" for b in hit["batch_size"])
        row["not_reached_at"] = " ".join(f"{b:g}" for b in missed)
        if len(hit):
            fit = fit_tradeoff(hit["batch_size"], hit["steps"], level=level, n_bootstrap=n_bootstrap,
                               min_log_sd=STEPS_MIN_LOG_SD)
        else:
            fit = TradeoffFit(level=level, message="no run reached this goal")
        row.update(fit.as_row())
        row.update(_b_simple_summary(hit))
        grid_factor = _grid_factor(hit)
        lr_fit = _lr_fit_for(hit, level, grid_factor)
        row.update(lr_grid_factor=grid_factor, lr_eps_max=lr_fit.eps_max, lr_eps_max_low=lr_fit.eps_max_ci[0],
                   lr_eps_max_high=lr_fit.eps_max_ci[1], lr_b_noise=lr_fit.b_noise,
                   lr_b_noise_low=lr_fit.b_noise_ci[0], lr_b_noise_high=lr_fit.b_noise_ci[1],
                   lr_n_points=lr_fit.n_points, lr_resid_rms=lr_fit.resid_rms,
                   lr_fit_message=lr_fit.message)
        row["warnings"] = "; ".join(_goal_warnings(fit, hit, missed, lr_fit))
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=keys + ["n_points", "b_crit", "warnings"])
    return pd.DataFrame(rows)


def _b_simple_summary(hit: pd.DataFrame) -> dict:
    measured = hit[np.isfinite(hit["b_simple"].astype(float)) & (hit["b_simple"].astype(float) > 0)] \
        if "b_simple" in hit.columns else hit.iloc[:0]
    values = measured["b_simple"].to_numpy(dtype=float) if len(measured) else np.array([])
    return {
        "b_simple": float(np.median(values)) if values.size else math.nan,
        "b_simple_gmean": float(np.exp(np.mean(np.log(values)))) if values.size else math.nan,
        "b_simple_min": float(values.min()) if values.size else math.nan,
        "b_simple_max": float(values.max()) if values.size else math.nan,
        "b_simple_n": int(values.size),
        "b_simple_batch_sizes": " ".join(f"{b:g}" for b in measured["batch_size"]),
        "b_simple_runs": ";".join(str(r) for r in measured["run_name"]) if "run_name" in measured else "",
    }


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


def _goal_warnings(fit: TradeoffFit, hit: pd.DataFrame, missed: list, lr_fit: LrFit) -> list[str]:
    notes = []
    n_b = hit["batch_size"].nunique()
    if n_b == 0:
        return ["no run reached this goal: raise the budget or drop the goal"]
    if n_b < FEW_BATCH_SIZES:
        notes.append(f"reached by only {n_b} batch size(s): "
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
    coarse = hit.loc[hit["steps"] < MIN_RESOLVED_STEPS, "batch_size"]
    if len(coarse):
        notes.append(f"reached in fewer than {MIN_RESOLVED_STEPS} steps at B=" + ",".join(f"{b:g}" for b in coarse)
                     + ": so few steps are barely resolved, prefer harder goals")
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
