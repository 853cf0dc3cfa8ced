"""Pareto fronts, the steps/examples tradeoff fit, B_crit against B_simple, and the paper's plots.

    python -m analysis.pareto SWEEP_DIR [--out DIR]         # from run records (docs/records.md)
    python -m analysis.pareto DIR1 DIR2 ... --out DIR [--labels A B ...]   # several sweeps, compared
    python -m analysis.pareto --from-csv FILE [--out DIR]   # from a table: goal, batch_size, steps
                                                            #   [, lr, examples, b_simple, reached]

Writes CSV tables, summary.md (also printed) and figures/*.png|pdf to --out (default
SWEEP_DIR/analysis, or FILE's folder/<stem>_analysis). docs/analysis.md describes every output.
Runs are fitted per experiment: per sweep (the directory a run belongs to) and variant (a hash of
every setting but batch size, lr and seed), task and optimizer; runs of different variants are
never pooled, and a folder that mixes them is named in a warning. With several experiments,
figures/compare_sweeps shows them side by side.
Bad input gives `error: ...` on stderr and exit status 2; warnings about the data are printed
and kept in the tables, and the report says what it can.
"""
from __future__ import annotations

import argparse
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.cli import run_command
from critbatch import plots, tradeoff

CSV_REQUIRED = ("goal", "batch_size", "steps")
_MAX_LISTED = 10


class AnalysisError(Exception):
    """Input the analysis cannot use; the message says what is wrong and what to do."""


@dataclass
class Analysis:
    runs: pd.DataFrame                      # one row per (run, goal): the input
    cand: pd.DataFrame                      # per (goal, B, lr), over seeds
    best: pd.DataFrame                      # per (goal, B): the best lr
    fits: pd.DataFrame                      # per goal
    notes: list[str] = field(default_factory=list)   # problems with the input, for the report


# ---------------------------------------------------------------------------------------------
# Input


def _rows(mask: pd.Series) -> str:
    """'line 3' / 'lines 2, 5': CSV line numbers (the header is line 1) of the rows in `mask`."""
    lines = (np.flatnonzero(mask.to_numpy()) + 2).tolist()
    more = f" and {len(lines) - _MAX_LISTED} more" if len(lines) > _MAX_LISTED else ""
    return ("line " if len(lines) == 1 else "lines ") + ", ".join(map(str, lines[:_MAX_LISTED])) + more


def _goal_threshold(goal: str) -> float:
    match = re.search(r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$", str(goal))
    return float(match.group(1)) if match else np.nan


def read_measurements_csv(path: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """A plain table of measurements as an analysable frame, and notes on rows that were fixed
    or dropped. Missing steps mean "did not reach the goal"; zero, negative or unparsable steps
    and bad batch sizes drop the row. Raises AnalysisError when nothing usable remains."""
    path = Path(path)
    try:
        raw = pd.read_csv(path, skipinitialspace=True)
    except FileNotFoundError:
        raise AnalysisError(f"{path}: no such file")
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise AnalysisError(f"{path}: not a readable CSV table ({exc})")
    raw.columns = [str(c).strip() for c in raw.columns]
    missing = [c for c in CSV_REQUIRED if c not in raw.columns]
    if missing:
        raise AnalysisError(f"{path}: missing column(s) {', '.join(missing)}; need {', '.join(CSV_REQUIRED)} "
                            f"(optional: lr, examples, b_simple, reached, seed, run_name, task, optimizer); "
                            f"found {', '.join(raw.columns) or 'none'}")
    if raw.empty:
        raise AnalysisError(f"{path}: the table has a header but no rows")
    notes: list[str] = []
    df = raw.copy()
    df["goal"] = df["goal"].astype(str).str.strip()
    keep = pd.Series(True, index=df.index)

    bad_goal = raw["goal"].isna()
    if bad_goal.any():
        notes.append(f"{_rows(bad_goal)}: no goal; dropped")
        keep &= ~bad_goal
    batch = pd.to_numeric(df["batch_size"], errors="coerce")
    bad_b = ~(np.isfinite(batch) & (batch > 0))
    if bad_b.any():
        notes.append(f"{_rows(bad_b)}: batch_size missing, not a number or <= 0; dropped")
        keep &= ~bad_b
    df["batch_size"] = batch

    steps = pd.to_numeric(df["steps"], errors="coerce")
    blank = raw["steps"].isna() | raw["steps"].astype(str).str.strip().str.lower().isin(["", "nan", "inf"])
    unparsable = steps.isna() & ~blank
    if unparsable.any():
        notes.append(f"{_rows(unparsable)}: steps is not a number; dropped")
        keep &= ~unparsable
    nonpositive = steps.notna() & ~(steps > 0)
    if nonpositive.any():
        notes.append(f"{_rows(nonpositive)}: steps <= 0 (e.g. {steps[nonpositive].iloc[0]:g}) "
                     "cannot be a step count; dropped")
        keep &= ~nonpositive
    steps = steps.where(np.isfinite(steps))
    if "reached" in df.columns:
        text = df["reached"].astype(str).str.strip().str.lower()
        reached = text.isin(["true", "1", "yes", "y", "t", "1.0"])
        contradiction = reached & steps.isna() & keep
        if contradiction.any():
            notes.append(f"{_rows(contradiction)}: reached=true but no steps; dropped")
            keep &= ~contradiction
        steps = steps.where(reached)
    else:
        reached = steps.notna()
        if (steps.isna() & keep).any():
            notes.append(f"{_rows(steps.isna() & keep)}: no steps (NaN or empty); counted as "
                         "'did not reach the goal'")
    df["steps"], df["reached"] = steps, reached & steps.notna()

    for col in ("lr", "b_simple"):
        if col in df.columns:
            values = pd.to_numeric(df[col], errors="coerce")
            bad = df[col].notna() & ~(np.isfinite(values) & (values > 0))
            if bad.any():
                notes.append(f"{_rows(bad & keep)}: {col} not a positive number; ignored")
            df[col] = values.where(np.isfinite(values) & (values > 0))
    if "examples" in df.columns:
        given = pd.to_numeric(df["examples"], errors="coerce")
        off = df["reached"] & given.notna() & ~np.isclose(given, df["batch_size"] * df["steps"], rtol=0.01)
        if (off & keep).any():
            notes.append(f"{_rows(off & keep)}: examples differs from batch_size*steps by more "
                         "than 1%; the analysis uses batch_size*steps")
        df = df.drop(columns=["examples"])
    for col in ("task", "optimizer", "run_name"):
        if col in df.columns:
            df[col] = df[col].astype(str)
    if "run_name" not in df.columns:
        df["run_name"] = [f"row{i + 2}" for i in range(len(df))]
    df = df[keep].reset_index(drop=True)
    if df.empty:
        raise AnalysisError(f"{path}: no usable rows left ({'; '.join(notes)})")
    if "goal_threshold" not in df.columns:
        df["goal_threshold"] = df["goal"].map(_goal_threshold)
        if df["goal_threshold"].isna().any():
            df = df.drop(columns=["goal_threshold"])
    if "goal_metric" not in df.columns and "goal_threshold" in df.columns:
        metric = df["goal"].str.extract(r"^\s*([A-Za-z_][\w.]*)\s*<=")[0]
        df["goal_metric"] = metric.fillna("metric")
    return df, notes


def load_records(sweep_dirs) -> tuple[pd.DataFrame, list[str]]:
    """critbatch.records.load_sweep of one sweep directory or several, with its problems turned
    into notes and errors explained."""
    from critbatch import records

    dirs = [Path(d) for d in ([sweep_dirs] if isinstance(sweep_dirs, (str, Path)) else sweep_dirs)]
    for sweep_dir in dirs:
        if not sweep_dir.is_dir():
            raise AnalysisError(f"{sweep_dir}: no such directory (give the sweep directory that holds runs/)")
    sweep_dir = dirs[0] if len(dirs) == 1 else ", ".join(map(str, dirs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # each problem is in attrs["problems"]; we print them once
        df = records.load_sweep(dirs)
    problems = df.attrs.get("problems", [])
    notes = list(df.attrs.get("notes", [])) + [f"{p['path']}: {p['problem']}" for p in problems]
    if df.empty:
        if problems:
            listed = "\n  ".join(notes[:_MAX_LISTED]) + (
                f"\n  ... and {len(notes) - _MAX_LISTED} more" if len(notes) > _MAX_LISTED else "")
            raise AnalysisError(f"{sweep_dir}: no finished run records; {len(problems)} partial or "
                                f"unreadable:\n  {listed}")
        raise AnalysisError(f"{sweep_dir}: no run records found (looked for {records.RUNS_DIR}/*/"
                            f"{records.RECORD_FILE}); is this the sweep directory?")
    n_failed = int((df.drop_duplicates("run_id")["status"] == "failed").sum())
    if n_failed:
        notes.append(f"{n_failed} run(s) failed (crashed); their lrs do not count as tried")
    return df, notes


def name_datasets(runs: pd.DataFrame) -> pd.DataFrame:
    """The task column with the dataset a task trained on where its name does not say it (the
    records' summary.data, Task.fingerprint: e.g. "mnist (mnist-5k)"), so every title, table and
    legend says which data a B_crit belongs to."""
    if runs.empty or "dataset" not in runs.columns:
        return runs
    named = runs["dataset"].notna() & (runs["dataset"] != runs["task"])
    runs = runs.copy()
    runs.loc[named, "task"] = runs.loc[named, "task"] + " (" + runs.loc[named, "dataset"] + ")"
    return runs


def label_sweeps(runs: pd.DataFrame, sweep_dirs, labels: list[str]) -> pd.DataFrame:
    """The sweep column renamed after `labels`, one per directory given (a directory that holds
    several sweeps: "label: sweep"), in place of the directories' names."""
    dirs = [Path(d).resolve() for d in sweep_dirs]
    if len(labels) != len(dirs):
        raise AnalysisError(f"--labels: {len(labels)} label(s) for {len(dirs)} sweep director"
                            f"{'y' if len(dirs) == 1 else 'ies'}; give one label per directory, in the same order")
    runs = runs.copy()
    where = runs["run_dir"].map(lambda d: next((i for i, root in enumerate(dirs) if Path(d).resolve().is_relative_to(root)),
                                               None))
    for i, label in enumerate(labels):
        mine = where == i
        several = runs.loc[mine, "sweep"].nunique() > 1
        runs.loc[mine, "sweep"] = (label + ": " + runs.loc[mine, "sweep"]) if several else label
    return runs


# ---------------------------------------------------------------------------------------------
# Analysis and report


def analyse(runs: pd.DataFrame, level: float = 0.95, n_bootstrap: int = 0,
            notes: list[str] | None = None, min_steps: float = tradeoff.MIN_FIT_STEPS) -> Analysis:
    cand = tradeoff.steps_by_lr(runs)
    best = tradeoff.best_runs(runs)
    fits = tradeoff.fit_all_goals(best, level=level, n_bootstrap=n_bootstrap, runs=runs, min_steps=min_steps)
    return Analysis(runs=runs, cand=cand, best=best, fits=fits, notes=list(notes or []))


#: what tells one experiment from another: sweep and variant where the input holds several
EXPERIMENT_KEYS = ("sweep", "variant")


def _combos(frame: pd.DataFrame) -> list[tuple[dict, pd.Series]]:
    """The experiments present, each as ({key: value}, row mask): (task, optimizer), and sweep
    and variant where the frame holds more than one (tradeoff.GROUP_KEYS fits them apart; the
    variant only where one sweep holds several)."""
    keys = [k for k in EXPERIMENT_KEYS if k in frame.columns and frame[k].nunique(dropna=False) > 1]
    if "sweep" in keys and "variant" in keys and frame.groupby("sweep")["variant"].nunique().max() == 1:
        keys.remove("variant")  # each sweep holds one variant: its name (or label) tells them apart
    keys += [k for k in ("task", "optimizer") if k in frame.columns]
    if not keys:
        return [({}, pd.Series(True, index=frame.index))]
    out = []
    for values in frame[keys].drop_duplicates().itertuples(index=False):
        sel = dict(zip(keys, values))
        mask = pd.Series(True, index=frame.index)
        for k, v in sel.items():
            mask &= frame[k] == v
        out.append((sel, mask))
    return out


def _select(frame: pd.DataFrame, sel: dict) -> pd.DataFrame:
    mask = pd.Series(True, index=frame.index)
    for k, v in sel.items():
        mask &= frame[k] == v
    return frame[mask]


def _g(x: float) -> str:
    return f"{x:.3g}" if isinstance(x, (int, float, np.floating)) and np.isfinite(x) else "–"


def _interval(low: float, high: float) -> str:
    return f"[{_g(low)}, {_g(high)}]" if np.isfinite(low) else ""


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return lines


def render_summary(a: Analysis, source: str, files: list[Path], figure_notes: list[str],
                   out_dir: Path, min_steps: float = tradeoff.MIN_FIT_STEPS) -> str:
    level = a.fits["level"].iloc[0] if "level" in a.fits and len(a.fits) else 0.95
    boot = "b_crit_boot_low" in a.fits and a.fits["b_crit_boot_low"].notna().any()
    n_runs = a.runs["run_id"].nunique() if "run_id" in a.runs else len(a.runs)
    seeds = "b_crit_seed_low" in a.fits and a.fits["b_crit_seed_low"].notna().any()
    lines = ["# Critical batch size: Pareto fronts and the steps/examples tradeoff", "",
             f"Input: `{source}` ({n_runs} runs, {a.runs['goal'].nunique()} goal(s)).",
             f"Fit per goal: S = S_min (1 + B_crit/B) on the best lr at each batch size, least "
             f"squares on ln S, on the points reached in at least {min_steps:g} steps (not censored); intervals are {level:.0%}, exp(ln x ± t·se) "
             f"with t of n-2 degrees of freedom"
             + ("; in parentheses the interval from resampling the seeds of every (B, lr) and picking "
                "the best lr again (seed-to-seed noise and the winner's curse included)." if seeds else
                "; in parentheses a residual-bootstrap interval." if boot else "."),
             "B_simple at the goal: the median over the runs of the fitted best cells (all seeds), each "
             "probed at the parameters that crossed the goal, with a 95% bootstrap interval, or a lower "
             "bound where |G|^2 is not resolved; path: B_simple averaged along the path to the goal (median over the best runs "
             "that resolve it, standard error at most 25%), the quantity B_crit is to be compared with; init: at "
             "initialisation. B_noise at the goal where probed (noise_scale.hessian_probe_batches), and its path "
             "average likewise; the lr fit's B_noise echoes how the lr grid was "
             "centred. The runs are named in tradeoff_fits.csv (b_simple_runs).", ""]
    for sel, _ in _combos(a.fits):
        fits = _select(a.fits, sel)
        best = _select(a.best, sel)
        if sel:
            lines += [f"## {' / '.join(str(v) for v in sel.values())}", ""]
        rows = []
        for _, f in fits.iterrows():
            b_crit = _g(f["b_crit"]) + " " + _interval(f["b_crit_low"], f["b_crit_high"])
            if seeds and np.isfinite(f["b_crit_seed_low"]):
                b_crit += f" ({_g(f['b_crit_seed_low'])}, {_g(f['b_crit_seed_high'])})"
            elif boot and np.isfinite(f["b_crit_boot_low"]):
                b_crit += f" ({_g(f['b_crit_boot_low'])}, {_g(f['b_crit_boot_high'])})"
            if f["b_simple_n"] and not f["b_simple_resolved"]:
                b_simple = f"≥ {_g(f['b_simple'])} (not resolved)"
            else:
                b_simple = _g(f["b_simple"]) + " " + _interval(f["b_simple_low"], f["b_simple_high"])
            b_noise = _g(f["lr_b_noise"]) + " " + _interval(f["lr_b_noise_low"], f["lr_b_noise_high"])
            rows.append([f["goal"], f["n_batch_sizes"], _g(f["s_min"]) + " " + _interval(f["s_min_low"], f["s_min_high"]),
                         _g(f["e_min"]) + " " + _interval(f["e_min_low"], f["e_min_high"]), b_crit,
                         b_simple, _g(f["b_simple_path"]), _g(f["b_simple_init"]), _g(f["b_noise"]),
                         _g(f["b_noise_path"]), b_noise, _g(f["resid_rms"])])
        lines += _md_table(["goal", "#B fitted", "S_min", "E_min", "B_crit", "B_simple at goal",
                            "B_simple path", "B_simple init", "B_noise at goal", "B_noise path", "B_noise (lr fit)",
                            "rms ln S"], rows)
        warn = [(f["goal"], w) for _, f in fits.iterrows() for w in str(f["warnings"]).split("; ") if w]
        lines += ["", "### Warnings", ""]
        lines += [f"- **{g}**: {w}" for g, w in warn] or ["- none"]
        lines += ["", "### Best run per goal and batch size", ""]
        rows = []
        for _, r in best.iterrows():
            steps = "censored" if r.get("censored", False) else _g(r["steps"]) if r["reached"] else "not reached"
            rows.append([r["goal"], f"{r['batch_size']:g}", _g(r["lr"]) if r["reached"] else "–",
                         steps, _g(r["examples"]),
                         _g(r["b_simple"]), f"{_g(r['lr_grid_min'])}–{_g(r['lr_grid_max'])} ({r['n_lrs']})",
                         "" if r["on_front"] or not r["reached"] else "dominated", r["warnings"]])
        lines += _md_table(["goal", "B", "best lr", "steps", "examples", "B_simple", "lr grid (n)",
                            "front", "notes"], rows)
        lines.append("")
    if a.notes:
        lines += ["## Input problems", ""]
        lines += [f"- {n}" for n in a.notes[:50]]
        if len(a.notes) > 50:
            lines.append(f"- ... and {len(a.notes) - 50} more (input_problems.csv)")
        lines.append("")
    if figure_notes:
        lines += ["## Figures not drawn", ""] + [f"- {n}" for n in figure_notes] + [""]
    lines += ["## Files", ""] + [f"- {p.relative_to(out_dir)}" for p in files] + [""]
    return "\n".join(lines)


def write_tables(a: Analysis, out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = {"steps_to_goal.csv": a.runs, "steps_by_lr.csv": a.cand, "best_runs.csv": a.best,
              "tradeoff_fits.csv": a.fits,
              "input_problems.csv": pd.DataFrame({"problem": a.notes}, dtype=object)}
    paths = []
    for name, frame in tables.items():
        path = out_dir / name
        frame.to_csv(path, index=False)
        paths.append(path)
    return paths


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_")


def _focus_goal(fits: pd.DataFrame, best: pd.DataFrame, goal: str | None) -> str | None:
    """The goal for the heatmap and the curves: asked for, else the hardest goal with a fit,
    else the goal reached by the most batch sizes."""
    if goal is not None:
        return goal if goal in set(fits["goal"]) else None
    identified = fits[fits["identified"].astype(bool)]
    if len(identified):
        return identified["goal"].iloc[-1]
    counts = best[best["reached"]].groupby("goal", sort=False).size()
    return counts.idxmax() if len(counts) else None


def draw_figures(a: Analysis, out_dir: Path, curves_for, goal: str | None = None) -> tuple[list[Path], list[str]]:
    """Figures (a)-(e) per (task, optimizer); `curves_for(best_rows)` returns their curves or None."""
    fig_dir = out_dir / "figures"
    combos = _combos(a.fits)
    files, skipped = [], []
    for sel, _ in combos:
        fits, best, cand = _select(a.fits, sel), _select(a.best, sel), _select(a.cand, sel)
        sub = " / ".join(str(v) for v in sel.values()) or None
        suffix = ("_" + _safe("_".join(str(v) for v in sel.values()))) if len(combos) > 1 else ""
        where = f" ({sub})" if sub else ""
        any_reached = bool(best["reached"].any())
        has_lr = "lr" in best and best["lr"].notna().any()
        if any_reached:
            files += plots.save_figure(plots.pareto_fronts(best, fits, sub), fig_dir, "pareto_fronts" + suffix)
        else:
            skipped.append(f"pareto_fronts{where}: no run reached any goal")
        files += plots.save_figure(plots.noise_scales(fits, sub), fig_dir, "noise_scales" + suffix)
        files += plots.save_figure(plots.b_crit_vs_noise_scale(fits, sub), fig_dir, "b_crit_vs_b_simple" + suffix)
        if any_reached and has_lr:
            files += plots.save_figure(plots.lr_vs_batch(best, fits, sub), fig_dir, "lr_vs_batch" + suffix)
        else:
            skipped.append(f"lr_vs_batch{where}: " + ("no lr column" if not has_lr else "no goal reached"))
        focus = _focus_goal(fits, best, goal)
        if focus is None:
            skipped.append(f"steps_heatmap, training_curves{where}: "
                           + (f"goal {goal!r} not among {list(fits['goal'])}" if goal else "no goal reached"))
            continue
        if has_lr:
            files += plots.save_figure(plots.steps_heatmap(cand, best, focus, sub), fig_dir, "steps_heatmap" + suffix)
        else:
            skipped.append(f"steps_heatmap{where}: no lr column")
        top = best[(best["goal"] == focus) & best["reached"]]
        curves = curves_for(top)
        if curves is None or curves.empty:
            skipped.append(f"training_curves{where}: no training curves (a plain table has none)")
            continue
        metric = top["goal_metric"].iloc[0] if "goal_metric" in top and len(top) else None
        if metric not in curves.columns:
            skipped.append(f"training_curves{where}: the curves have no column {metric!r}")
            continue
        thresholds = fits["goal_threshold"].tolist() if "goal_threshold" in fits else []
        files += plots.save_figure(plots.training_curves(curves, best, focus, metric, thresholds, sub),
                                   fig_dir, "training_curves" + suffix)
    if len(combos) > 1:
        files += plots.save_figure(compare_sweeps(a, combos), fig_dir, "compare_sweeps")
    return files, skipped


def compare_sweeps(a: Analysis, combos) -> "plots.Figure":
    """Several experiments in one figure: B_crit per goal (with its interval) and, at the hardest
    goal that every experiment fitted (else each one's hardest), the steps to reach it against B
    with the fitted S = S_min (1 + B_crit/B); one colour per experiment, labelled by what tells
    them apart (sweep / variant / task / optimizer)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    left, right = fig.subplots(1, 2)
    fitted = [set(_select(a.fits, sel).query("identified")["goal"]) for sel, _ in combos]
    common = set.intersection(*fitted) if fitted else set()
    order = list(dict.fromkeys(a.fits["goal"]))
    shared = [g for g in order if g in common]
    for i, (sel, _) in enumerate(combos):
        color, label = f"C{i % 10}", " / ".join(str(v) for v in sel.values())
        fits, best = _select(a.fits, sel), _select(a.best, sel)
        ok = fits[fits["identified"].astype(bool)]
        x = np.array([order.index(g) for g in ok["goal"]]) + (i - (len(combos) - 1) / 2) * 0.08
        if len(ok):
            err = np.vstack([ok["b_crit"] - ok["b_crit_low"], ok["b_crit_high"] - ok["b_crit"]])
            left.errorbar(x, ok["b_crit"], yerr=np.where(np.isfinite(err), err, 0), fmt="o-", color=color,
                          capsize=3, label=label)
        goal = shared[-1] if shared else (ok["goal"].iloc[-1] if len(ok) else None)
        if goal is None:
            continue
        hit = best[(best["goal"] == goal) & best["reached"] & ~best["censored"].astype(bool)]
        right.plot(hit["batch_size"], hit["steps"], "o", color=color)
        fit = fits[fits["goal"] == goal].iloc[0]
        if len(hit) and np.isfinite(fit["b_crit"]):
            b = np.geomspace(hit["batch_size"].min(), hit["batch_size"].max(), 100)
            right.plot(b, fit["s_min"] * (1 + fit["b_crit"] / b), "-", color=color, alpha=0.7)
    left.set_xticks(range(len(order)), order, rotation=30, ha="right", fontsize=8)
    left.set_yscale("log")
    left.set_ylabel("B_crit (fit, with its interval)")
    left.set_title("Critical batch size per goal")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("batch size B")
    right.set_ylabel("steps to the goal (best lr)")
    right.set_title("Steps to " + (f"the hardest common goal {shared[-1]}" if shared else "each one's hardest fitted goal"),
                    fontsize=10)
    for ax in (left, right):
        ax.grid(True, which="major", alpha=0.3)
    # Below the axes, where it covers no point: one entry per experiment (the right panel's markers
    # share the left panel's colours, and its title names the goal).
    handles, labels = left.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3), fontsize=8)
    return fig


def curves_of_best_runs(top: pd.DataFrame) -> pd.DataFrame | None:
    """Curves of just these runs, read from their record files (reading every record's curve,
    as load_curves does, would double the time on a large sweep)."""
    from critbatch import records

    if "run_dir" not in top.columns:
        return None
    frames = []
    for _, run in top.iterrows():
        if not isinstance(run["run_dir"], str):
            continue
        try:
            record = records.read_record(Path(run["run_dir"]) / records.RECORD_FILE)
        except records.RecordError:
            continue
        curve = pd.DataFrame(record["curve"])
        curve["run_id"], curve["run_name"] = run.get("run_id"), run["run_name"]
        frames.append(curve)
    return pd.concat(frames, ignore_index=True) if frames else None


# ---------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis.pareto", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", nargs="*", help="sweep directory holding runs/*/record.json (several: "
                   "compared; a folder of sweep directories: each of them)")
    p.add_argument("--from-csv", metavar="FILE", help="analyse a plain table instead: goal, batch_size, "
                   "steps [, lr, examples, b_simple, reached, seed, run_name, task, optimizer]")
    p.add_argument("--out", metavar="DIR", help="output folder (default SWEEP_DIR/analysis)")
    p.add_argument("--labels", nargs="+", metavar="LABEL", help="names of the sweeps in tables and figures, one "
                   "per SWEEP_DIR in the same order (default: the directories' names)")
    p.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals (0.95)")
    p.add_argument("--bootstrap", type=int, default=200, metavar="N",
                   help="residual-bootstrap resamples per goal for a second interval (200; 0: none)")
    p.add_argument("--min-steps", type=float, default=tradeoff.MIN_FIT_STEPS, metavar="S",
                   help=f"fit only points reached in at least S steps ({tradeoff.MIN_FIT_STEPS}: a step count "
                        "resolved to ~5%%; a noiseless metric evaluated every step, as linreg's, resolves less)")
    p.add_argument("--goal", help="goal for the heatmap and the curves (default: hardest goal with a fit)")
    p.add_argument("--no-figures", action="store_true", help="tables and summary only")
    p.add_argument("--quiet", action="store_true", help="do not print the summary")
    p.add_argument("--debug", action="store_true", help="show a traceback on unexpected errors")
    return p


def run(args: argparse.Namespace) -> Path:
    """The analysis for parsed arguments; returns the output folder."""
    if bool(args.sweep_dir) == (args.from_csv is not None):
        raise AnalysisError("give either SWEEP_DIR (one or more) or --from-csv FILE (exactly one of the two)")
    if args.labels and args.from_csv:
        raise AnalysisError("--labels names sweep directories; a table (--from-csv) has none")
    if args.labels and len(args.labels) != len(args.sweep_dir):
        raise AnalysisError(f"--labels: {len(args.labels)} label(s) for {len(args.sweep_dir)} sweep "
                            "directories; give one label per directory, in the same order")
    if not 0 < args.level < 1:
        raise AnalysisError(f"--level {args.level} must be between 0 and 1")
    if args.bootstrap < 0:
        raise AnalysisError(f"--bootstrap {args.bootstrap} must be >= 0")
    if not args.min_steps > 0:
        raise AnalysisError(f"--min-steps {args.min_steps} must be > 0")
    if args.from_csv:
        runs, notes = read_measurements_csv(args.from_csv)
        source = args.from_csv
        out_dir = Path(args.out) if args.out else Path(args.from_csv).with_name(Path(args.from_csv).stem + "_analysis")
    else:
        runs, notes = load_records(args.sweep_dir)
        runs = name_datasets(runs)
        if args.labels:
            runs = label_sweeps(runs, args.sweep_dir, args.labels)
        source = ", ".join(args.sweep_dir)
        if args.out is None and len(args.sweep_dir) > 1:
            raise AnalysisError("several sweep directories: say where the comparison goes with --out DIR")
        out_dir = Path(args.out) if args.out else Path(args.sweep_dir[0]) / "analysis"
    for note in notes[:_MAX_LISTED]:
        print(f"warning: {note}", file=sys.stderr)
    if len(notes) > _MAX_LISTED:
        print(f"warning: ... and {len(notes) - _MAX_LISTED} more input problems (input_problems.csv)", file=sys.stderr)
    a = analyse(runs, level=args.level, n_bootstrap=args.bootstrap, notes=notes, min_steps=args.min_steps)
    files = write_tables(a, out_dir)
    figure_notes: list[str] = []
    if not args.no_figures:
        fig_files, figure_notes = draw_figures(a, out_dir, curves_of_best_runs if not args.from_csv else (lambda top: None),
                                               goal=args.goal)
        files += fig_files
    if args.goal and args.goal not in set(a.fits["goal"]):
        print(f"warning: --goal {args.goal!r} is not a goal here; goals: {', '.join(map(str, a.fits['goal']))}",
              file=sys.stderr)
    summary_path = out_dir / "summary.md"
    summary = render_summary(a, source, files + [summary_path], figure_notes, out_dir, args.min_steps)
    summary_path.write_text(summary)
    if not args.quiet:
        print(summary)
    if not a.fits["identified"].astype(bool).any():
        print("warning: no goal could be fitted (see the warnings in summary.md)", file=sys.stderr)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    return run_command(run, _parser().parse_args(argv), AnalysisError)


if __name__ == "__main__":
    sys.exit(main())
