"""The paper's figures, drawn from the frames of critbatch.tradeoff.

Each function takes tidy frames for one (task, optimizer) and returns a matplotlib Figure; it
uses no pyplot, so it neither needs nor changes a backend and leaves no global state.
`save_figure` writes PNG and PDF. Batch sizes and counts are plotted on log axes, as in the paper.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

_MAX_ANNOTATED_CELLS = 150


def save_figure(fig: Figure, directory: str | Path, name: str) -> list[Path]:
    """Write `name`.png and `name`.pdf under `directory`; return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / f"{name}.png", directory / f"{name}.pdf"]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    return paths


def _goal_colors(goals) -> dict:
    goals = list(dict.fromkeys(goals))
    cmap = colormaps["viridis"]
    return {g: cmap(0.85 * i / max(len(goals) - 1, 1)) for i, g in enumerate(goals)}


def _fmt(x: float) -> str:
    return f"{x:.3g}" if np.isfinite(x) else "n/a"


def _short(x: float) -> str:
    """A step count in at most 4 characters, to fit inside a heatmap cell."""
    for scale, unit in ((1e6, "M"), (1e3, "k")):
        if x >= scale:
            v = x / scale
            return f"{v:.1f}{unit}" if v < 10 else f"{v:.0f}{unit}"
    return f"{x:.0f}"


def _title(ax, text: str, subtitle: str | None) -> None:
    ax.set_title(text + (f"\n{subtitle}" if subtitle else ""), fontsize=10)


def pareto_fronts(best: pd.DataFrame, fits: pd.DataFrame, subtitle: str | None = None) -> Figure:
    """(a) Steps against examples to reach each goal, log-log, with the fitted hyperbolas
    (S/S_min - 1)(E/E_min - 1) = 1; a diamond marks B_crit (S = 2 S_min, E = 2 E_min)."""
    fig = Figure(figsize=(7, 5.2), layout="constrained")
    ax = fig.subplots()
    colors = _goal_colors(fits["goal"])
    reached = best[best["reached"]]
    labelled = None
    for _, fit in fits.iterrows():
        pts = reached[reached["goal"] == fit["goal"]].sort_values("batch_size")
        c = colors[fit["goal"]]
        label = f"{fit['goal']}: B_crit={_fmt(fit['b_crit'])}"
        if np.isfinite(fit["b_crit_low"]):
            label += f" [{_fmt(fit['b_crit_low'])}, {_fmt(fit['b_crit_high'])}]"
        ax.plot(pts["examples"], pts["steps"], "o", color=c, label=label, ms=5)
        edge = pts[pts["lr_at_grid_edge"]] if "lr_at_grid_edge" in pts else pts.iloc[:0]
        ax.plot(edge["examples"], edge["steps"], "o", mfc="none", mec="red", ms=9, mew=1)
        if fit["identified"]:
            b = np.geomspace(pts["batch_size"].min() / 4, pts["batch_size"].max() * 4, 200)
            s = fit["s_min"] * (1 + fit["b_crit"] / b)
            ax.plot(b * s, s, "-", color=c, lw=1.2)
            ax.plot(2 * fit["e_min"], 2 * fit["s_min"], "D", color=c, mec="black", ms=6)
        if len(pts):
            labelled = pts
    if labelled is not None:  # batch sizes next to the points of the hardest reached goal
        for _, r in labelled.iterrows():
            ax.annotate(f"B={r['batch_size']:g}", (r["examples"], r["steps"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points", color="0.3")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("examples processed to reach the goal, E = B·S")
    ax.set_ylabel("optimizer steps to reach the goal, S")
    handles, labels = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color="0.3", lw=1.2), Line2D([], [], marker="D", ls="", color="0.5", mec="black"),
                Line2D([], [], marker="o", ls="", mfc="none", mec="red")]
    labels += ["fit S = S_min(1 + B_crit/B)", "B_crit: S = 2 S_min, E = 2 E_min", "best lr at grid edge"]
    ax.legend(handles, labels, fontsize=7, loc="best")
    _title(ax, "Steps–examples tradeoff (Pareto fronts), best lr per batch size", subtitle)
    ax.grid(True, which="major", alpha=0.3)
    return fig


def _goal_axis(ax, fits: pd.DataFrame) -> np.ndarray:
    """x positions for goals: the threshold (log, reversed: harder to the right) when numeric."""
    thr = pd.to_numeric(fits.get("goal_threshold", pd.Series(np.nan, index=fits.index)), errors="coerce")
    if thr.notna().all() and (thr > 0).all() and thr.nunique() == len(thr):
        ax.set_xscale("log")
        thr = thr.to_numpy(dtype=float)
        ax.set_xticks(thr, [f"{t:g}" for t in thr])
        ax.minorticks_off()
        ax.set_xlim(thr.max() * 1.25, thr.min() / 1.25)   # reversed: harder goals to the right
        metric = fits["goal_metric"].iloc[0] if "goal_metric" in fits else "metric"
        ax.set_xlabel(f"goal: {metric} threshold (harder goals to the right)")
        return thr
    x = np.arange(len(fits), dtype=float)
    ax.set_xticks(x, [str(g) for g in fits["goal"]], rotation=20, fontsize=8)
    ax.set_xlabel("goal (easiest first)")
    return x


def _yerr(values, low, high) -> np.ndarray:
    values, low, high = (np.asarray(v, dtype=float) for v in (values, low, high))
    err = np.vstack([values - low, high - values])
    return np.where(np.isfinite(err), err, 0.0)


def noise_scales(fits: pd.DataFrame, subtitle: str | None = None) -> Figure:
    """(b) B_crit (with its interval) against the goal, beside B_simple measured on the best
    runs (median, bar = range over them) and B_noise from the best-lr curve."""
    fig = Figure(figsize=(7, 4.8), layout="constrained")
    ax = fig.subplots()
    x = _goal_axis(ax, fits)
    span = np.ptp(np.log(x)) if ax.get_xscale() == "log" and len(x) > 1 else 1.0
    shift = np.exp(0.015 * max(span, 0.5)) if ax.get_xscale() == "log" else 0.08

    def dx(k):  # small horizontal offsets so the three series do not hide one another
        return x * shift ** k if ax.get_xscale() == "log" else x + k * shift

    ok = fits["identified"].astype(bool).to_numpy()
    if ok.any():
        ax.errorbar(dx(-1)[ok], fits["b_crit"][ok],
                    yerr=_yerr(fits["b_crit"], fits["b_crit_low"], fits["b_crit_high"])[:, ok],
                    fmt="o", color="C0", capsize=3, label=f"B_crit (fit, {fits['level'].iloc[0]:.0%} interval)")
    measured = fits["b_simple"].notna() & fits.get("b_simple_resolved", pd.Series(True, index=fits.index)).astype(bool)
    has_bs = measured.to_numpy()
    if has_bs.any():
        low = fits.get("b_simple_low", fits["b_simple"])
        high = fits.get("b_simple_high", fits["b_simple"])
        ax.errorbar(dx(0)[has_bs], fits["b_simple"][has_bs], yerr=_yerr(fits["b_simple"], low, high)[:, has_bs],
                    fmt="s", color="C1", capsize=3, label="B_simple at the goal (median over the best runs, 95%)")
    bound = (fits["b_simple"].notna() & ~measured).to_numpy()
    if bound.any():
        ax.plot(dx(0)[bound], fits["b_simple"][bound], "^", color="C1", mfc="none", ms=8,
                label="B_simple not resolved: at least this")
    if "b_simple_path" in fits and fits["b_simple_path"].notna().any():
        path = fits["b_simple_path"].notna().to_numpy()
        ax.plot(dx(0.5)[path], fits["b_simple_path"][path], "D", color="C3", mfc="none",
                label="B_simple averaged along the path to the goal (median)")
    if "b_simple_init" in fits and fits["b_simple_init"].notna().any():
        ax.axhline(float(np.nanmedian(fits["b_simple_init"])), color="C3", ls=":", lw=1,
                   label="B_simple at initialisation")
    has_bn = fits["lr_b_noise"].notna().to_numpy() if "lr_b_noise" in fits else np.zeros(len(fits), bool)
    if has_bn.any():
        ax.errorbar(dx(1)[has_bn], fits["lr_b_noise"][has_bn],
                    yerr=_yerr(fits["lr_b_noise"], fits["lr_b_noise_low"], fits["lr_b_noise_high"])[:, has_bn],
                    fmt="^", color="C2", capsize=3, mfc="none", label="B_noise from the best-lr fit (eq. 2.6)")
    ax.set_yscale("log")
    ax.set_ylabel("batch size (examples per step)")
    if not (ok.any() or has_bs.any() or has_bn.any()):
        ax.text(0.5, 0.5, "nothing to show: no goal has a fit or a B_simple", transform=ax.transAxes, ha="center")
    else:
        ax.legend(fontsize=8, loc="best")
    ax.grid(True, which="major", alpha=0.3)
    _title(ax, "Critical batch size vs the simple noise scale at each goal", subtitle)
    return fig


def b_crit_vs_noise_scale(fits: pd.DataFrame, subtitle: str | None = None) -> Figure:
    """(f) B_crit against the noise scales at each goal, log-log, with y = x, as the paper compares
    them: B_simple and B_noise averaged along the path to the goal (what S = S_min + E_min/B
    integrates; filled; from the best runs that resolve it, tradeoff.MAX_PATH_RELATIVE_SE)
    and B_simple and (where probed) B_noise at the goal (open); error bars are 95%."""
    fig = Figure(figsize=(6.2, 5.4), layout="constrained")
    ax = fig.subplots()
    ok = fits["identified"].astype(bool)
    colors = _goal_colors(fits["goal"])
    series = [("b_simple_path", "D", True), ("b_noise_path", "^", True), ("b_simple", "s", False),
              ("b_noise", "^", False)]
    values = []
    for column, marker, filled in series:
        if column not in fits:
            continue
        for _, f in fits[ok & fits[column].notna()].iterrows():
            xerr = None
            if np.isfinite(f.get(f"{column}_low", np.nan)):
                xerr = [[max(f[column] - f[f"{column}_low"], 0)], [max(f[f"{column}_high"] - f[column], 0)]]
            ax.errorbar(f[column], f["b_crit"], xerr=xerr,
                        yerr=_yerr([f["b_crit"]], [f["b_crit_low"]], [f["b_crit_high"]]),
                        fmt=marker, color=colors[f["goal"]], mfc=None if filled else "none", capsize=2, ms=6)
            values += [f[column], f["b_crit"]]
    for _, f in fits.iterrows():
        ax.plot([], [], "-", color=colors[f["goal"]], label=str(f["goal"]))
    labels = {"b_simple_path": "x: B_simple averaged along the path", "b_simple": "x: B_simple at the goal",
              "b_noise": "x: B_noise at the goal", "b_noise_path": "x: B_noise averaged along the path"}
    for column, marker, filled in series:
        if column in fits and fits[column].notna().any():
            ax.plot([], [], marker, color="0.4", mfc=None if filled else "none", ls="", label=labels[column])
    values = np.asarray([v for v in values if np.isfinite(v) and v > 0])
    if values.size:
        lo, hi = values.min() / 2, values.max() * 2
        ax.plot([lo, hi], [lo, hi], "--", color="0.5", lw=1, label="y = x")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):  # 1-2-5 labels: the default minor labels overlap over 1-2 decades
            axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            axis.set_minor_formatter(NullFormatter())
    else:
        ax.text(0.5, 0.5, "nothing to show: no goal has both a fit and a noise scale", transform=ax.transAxes,
                ha="center")
    ax.set_xlabel("noise scale")
    ax.set_ylabel("critical batch size B_crit (fit)")
    ax.legend(fontsize=7, loc="best")
    ax.grid(True, which="major", alpha=0.3)
    _title(ax, "B_crit against the noise scales at each goal", subtitle)
    return fig


def lr_vs_batch(best: pd.DataFrame, fits: pd.DataFrame, subtitle: str | None = None) -> Figure:
    """(c) Best lr against B per goal, with the fit eps_max/(1 + B_noise/B); grey bars show the
    lr grid tried at each B, open red circles the best lrs that sit at its edge."""
    fig = Figure(figsize=(7, 4.8), layout="constrained")
    ax = fig.subplots()
    colors = _goal_colors(fits["goal"])
    grid = best.drop_duplicates("batch_size")
    ax.vlines(grid["batch_size"], grid["lr_grid_min"], grid["lr_grid_max"], color="0.85", lw=6,
              label="lr grid tried", zorder=0)
    reached = best[best["reached"] & best["lr"].notna()]
    for _, fit in fits.iterrows():
        pts = reached[reached["goal"] == fit["goal"]]
        c = colors[fit["goal"]]
        label = f"{fit['goal']}"
        if np.isfinite(fit.get("lr_b_noise", np.nan)):
            label += f": eps_max={_fmt(fit['lr_eps_max'])}, B_noise={_fmt(fit['lr_b_noise'])}"
            b = np.geomspace(pts["batch_size"].min() / 2, pts["batch_size"].max() * 2, 200)
            ax.plot(b, fit["lr_eps_max"] / (1 + fit["lr_b_noise"] / b), "-", color=c, lw=1.2)
        ax.plot(pts["batch_size"], pts["lr"], "o", color=c, ms=5, label=label)
        edge = pts[pts["lr_at_grid_edge"]]
        ax.plot(edge["batch_size"], edge["lr"], "o", mfc="none", mec="red", ms=9)
    ax.plot([], [], "o", mfc="none", mec="red", label="best lr at grid edge")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size B (examples per step)")
    ax.set_ylabel("best learning rate")
    ax.legend(fontsize=7, loc="best")
    ax.grid(True, which="major", alpha=0.3)
    _title(ax, "Best learning rate vs batch size, fit ε(B) = ε_max / (1 + B_noise/B)", subtitle)
    return fig


def steps_heatmap(cand: pd.DataFrame, best: pd.DataFrame, goal: str, subtitle: str | None = None) -> Figure:
    """(d) Steps to `goal` for every (batch size, lr) tried; x marks a setting that did not reach
    it, a black frame the best lr at each B. `cand` is critbatch.tradeoff.steps_by_lr's frame."""
    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.subplots()
    cells = cand[(cand["goal"] == goal) & cand["lr"].notna()]
    hit, miss = cells[cells["reached"]], cells[~cells["reached"]]
    if len(hit):
        norm = LogNorm(hit["steps"].min(), max(hit["steps"].max(), hit["steps"].min() * 1.01))
        sc = ax.scatter(hit["batch_size"], hit["lr"], c=hit["steps"], cmap="viridis_r", norm=norm,
                        marker="s", s=260, edgecolors="none")
        fig.colorbar(sc, ax=ax, label=f"steps to reach {goal}")
        if len(cells) <= _MAX_ANNOTATED_CELLS:
            for _, r in hit.iterrows():
                ax.annotate(_short(r["steps"]), (r["batch_size"], r["lr"]), ha="center", va="center",
                            fontsize=5.5, color="black" if norm(r["steps"]) < 0.5 else "white")
    ax.scatter(miss["batch_size"], miss["lr"], marker="x", color="0.5", s=40, label="did not reach the goal")
    top = best[(best["goal"] == goal) & best["reached"]]
    ax.scatter(top["batch_size"], top["lr"], marker="s", s=320, facecolors="none", edgecolors="black",
               linewidths=1.5, label="best lr at each B")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size B (examples per step)")
    ax.set_ylabel("learning rate")
    ax.legend(fontsize=7, loc="best")
    _title(ax, f"Steps to reach {goal} over the (B, lr) grid (median over seeds)", subtitle)
    return fig


def training_curves(curves: pd.DataFrame, best: pd.DataFrame, goal: str, metric: str,
                    thresholds=(), subtitle: str | None = None) -> Figure:
    """(e) The metric against steps and against examples for the best run at each B for `goal`
    (log x; dashed lines at the goal thresholds)."""
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    top = best[(best["goal"] == goal) & best["reached"]].sort_values("batch_size")
    key = "run_id" if "run_id" in top.columns and "run_id" in curves.columns else "run_name"
    norm = LogNorm(top["batch_size"].min(), max(top["batch_size"].max(), top["batch_size"].min() * 1.01)) \
        if len(top) else None
    cmap = colormaps["plasma"]
    positive = True
    for _, run in top.iterrows():
        c = curves[curves[key] == run[key]].sort_values("step")
        c = c[c["step"] > 0]
        if metric not in c or c.empty:
            continue
        y = c[metric].to_numpy(dtype=float)
        positive &= bool(np.all(y[np.isfinite(y)] > 0))
        color = cmap(0.85 * norm(run["batch_size"]))
        label = f"B={run['batch_size']:g}, lr={run['lr']:.3g}"
        axes[0].plot(c["step"], y, color=color, lw=1, label=label)
        axes[1].plot(c["examples"], y, color=color, lw=1)
        axes[0].plot(run["steps"], run.get("goal_threshold", np.nan), "o", color=color, ms=4)
        axes[1].plot(run["examples"], run.get("goal_threshold", np.nan), "o", color=color, ms=4)
    for ax, xlabel in zip(axes, ("optimizer steps", "examples processed")):
        for t in thresholds:
            ax.axhline(t, ls="--", color="0.6", lw=0.8)
        ax.set_xscale("log")
        if positive:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel(f"{metric} (as logged)")
    if len(top):
        axes[0].legend(fontsize=6, loc="best", ncol=2)
    else:
        axes[0].text(0.5, 0.5, "no run reached this goal", transform=axes[0].transAxes, ha="center")
    fig.suptitle(f"Training curves of the best run at each B for {goal} (dashed: goal thresholds; "
                 f"dot: where the goal was reached)" + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    return fig


def local_critical_batch(points: pd.DataFrame, trunk_curve: pd.DataFrame, grid: pd.DataFrame | None = None,
                         subtitle: str | None = None) -> Figure:
    """The critical batch over training, three ways, against the trunk's examples (left) and its
    loss (right, falling to the right): the local critical batch at each branch point (branch runs;
    bars: the seeds' interval; up/down triangles where it is at least the largest / at most the
    smallest batch tried), B_simple and B_noise along the trunk (the noise-scale window, solid; their
    path averages, dashed), and the grid's B_crit at the goals where the trunk met them (diamonds,
    with the fit's interval). `points`: critbatch.local_batch.local_critical_batches plus `loss`;
    `trunk_curve`: step, examples, loss and the noise-scale columns; `grid`: goal, examples, loss,
    b_crit, b_crit_low, b_crit_high."""
    fig = Figure(figsize=(12, 5), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, x in zip(axes, ("examples", "loss")):
        curve = trunk_curve[(trunk_curve["examples"] > 0) & np.isfinite(trunk_curve[x])]
        for column, color, style, label in (("b_simple", "C1", "-", "B_simple (trunk, window)"),
                                            ("b_noise", "C2", "-", "B_noise (trunk, window)"),
                                            ("b_simple_path", "C1", "--", "B_simple averaged along the path"),
                                            ("b_noise_path", "C2", "--", "B_noise averaged along the path")):
            if column in curve and curve[column].notna().any():
                ok = curve[column] > 0
                ax.plot(curve.loc[ok, x], curve.loc[ok, column], style, color=color, lw=1.2, label=label)
        measured = points[np.isfinite(points["b_local"]) & np.isfinite(points[x])]
        inner = measured[~measured["saturated"] & ~measured["floor"]]
        ax.errorbar(inner[x], inner["b_local"], yerr=_yerr(inner["b_local"], inner["low"], inner["high"]), fmt="o",
                    color="C0", capsize=3, ms=6, label="local critical batch (branches; seeds' 95% interval)")
        for flag, marker, text in (("saturated", "^", "at least (every multiplier within tolerance)"),
                                   ("floor", "v", "at most B0 (no larger multiplier within tolerance)")):
            part = measured[measured[flag]]
            if len(part):
                ax.plot(part[x], part["b_local"], marker, color="C0", ms=8, mfc="none", label=f"local: {text}")
        if grid is not None and len(grid):
            shown = grid[np.isfinite(grid[x]) & np.isfinite(grid["b_crit"])]
            ax.errorbar(shown[x], shown["b_crit"], yerr=_yerr(shown["b_crit"], shown["b_crit_low"], shown["b_crit_high"]),
                        fmt="D", color="C3", capsize=3, ms=6, label="grid B_crit at the goal (fit, 95%)")
        ax.set_yscale("log")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_xscale("symlog", linthresh=max(1.0, float(points["examples"][points["examples"] > 0].min())
                                               if (points["examples"] > 0).any() else 1.0))
    axes[0].set_xlim(left=0)   # examples are never negative: no empty half of the symlog axis
    axes[0].set_xlabel("examples the trunk had trained on (branch point)")
    axes[1].set_xscale("log")
    axes[1].invert_xaxis()
    axes[1].set_xlabel("the trunk's loss there (falling to the right)")
    axes[0].set_ylabel("batch size")
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle("The critical batch over training: local (branch runs), noise scales (trunk), grid (B_crit per goal)"
                 + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    return fig


#: the paper's "within an order of magnitude": B_simple predicts B_crit when their ratio lies in [1/10, 10]
ORDER_OF_MAGNITUDE = 10.0


def b_crit_vs_b_simple_across(table: pd.DataFrame, reference: pd.DataFrame | None = None,
                              title: str | None = None) -> Figure:
    """The paper's summary figure (McCandlish et al. 2018, Fig. 4 and Table 1) for several
    experiments: B_crit (the fit, with its interval) against B_simple at every fitted goal,
    log-log, one colour per experiment (column `label`): B_simple at the goal (filled circles,
    annotated with the goal's threshold) and averaged along the path to it (open squares, joined
    to the goal's circle), with y = x and the band within a factor ORDER_OF_MAGNITUDE of it.
    `table`: one row per goal with label, goal_threshold, b_crit, b_crit_low, b_crit_high,
    b_simple and b_simple_path (NaN where not measured). `reference`: points drawn in grey
    (columns label, b_simple, b_crit), e.g. the paper's own Table 1. The legend sits outside the
    axes, where it covers no point."""
    fig = Figure(figsize=(10.5, 6.4), layout="constrained")
    ax = fig.subplots()
    values = []
    for i, (label, rows) in enumerate(table.groupby("label", sort=False)):
        color = f"C{i % 10}"
        yerr = _yerr(rows["b_crit"], rows["b_crit_low"], rows["b_crit_high"])
        for column, marker, filled in (("b_simple", "o", True), ("b_simple_path", "s", False)):
            shown = rows[column].notna().to_numpy() & (rows[column] > 0).to_numpy()
            if shown.any():
                ax.errorbar(rows[column][shown], rows["b_crit"][shown], yerr=yerr[:, shown], fmt=marker,
                            color=color, mfc=color if filled else "none", capsize=2, ms=6, elinewidth=0.8)
                values += rows[column][shown].tolist() + rows["b_crit_low"][shown].tolist() \
                    + rows["b_crit_high"][shown].tolist() + rows["b_crit"][shown].tolist()
        for _, r in rows.iterrows():
            if np.isfinite(r["b_simple"]) and np.isfinite(r["b_simple_path"]):
                ax.plot([r["b_simple"], r["b_simple_path"]], [r["b_crit"]] * 2, "-", color=color, lw=0.6, alpha=0.6)
            if np.isfinite(r["b_simple"]) and np.isfinite(r.get("goal_threshold", np.nan)):
                ax.annotate(f"{r['goal_threshold']:g}", (r["b_simple"], r["b_crit"]), fontsize=6, color=color,
                            xytext=(4, -9), textcoords="offset points")
        ax.plot([], [], "o", color=color, label=label)
    if reference is not None and len(reference):
        ax.plot(reference["b_simple"], reference["b_crit"], "X", color="0.45", ms=8, ls="")
        for _, r in reference.iterrows():
            ax.annotate(r["label"], (r["b_simple"], r["b_crit"]), fontsize=6.5, color="0.35",
                        xytext=(5, 3), textcoords="offset points")
        values += reference["b_simple"].tolist() + reference["b_crit"].tolist()
        ax.plot([], [], "X", color="0.45", ls="", label="paper's Table 1 (start, average)")
    ax.plot([], [], "o", color="0.4", label="x: B_simple at the goal (goal's threshold beside it)")
    ax.plot([], [], "s", color="0.4", mfc="none", label="x: B_simple averaged along the path")
    values = np.asarray([v for v in values if np.isfinite(v) and v > 0])
    if values.size:
        lo, hi = values.min() / 2, values.max() * 2
        line = np.geomspace(lo, hi, 50)
        ax.fill_between(line, line / ORDER_OF_MAGNITUDE, line * ORDER_OF_MAGNITUDE, color="0.9", zorder=0,
                        label=f"within {ORDER_OF_MAGNITUDE:g}x of y = x")
        ax.plot(line, line, "--", color="0.4", lw=1, label="B_crit = B_simple")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xscale("log")
        ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "nothing to show: no goal has both a fit and B_simple", transform=ax.transAxes,
                ha="center")
    ax.set_xlabel("simple noise scale B_simple")
    ax.set_ylabel("critical batch size B_crit (fit, 95% interval)")
    ax.grid(True, which="major", alpha=0.3)
    ax.set_aspect("equal", adjustable="box")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=7.5)
    ax.set_title(title or "B_crit against B_simple at every fitted goal, across tasks", fontsize=10)
    return fig
