"""critbatch.tradeoff: the fit recovers the truth with honest intervals; best-run selection and
its warnings; the degenerate cases say so instead of returning a number."""
import math

import numpy as np
import pandas as pd
import pytest

from critbatch.tradeoff import best_runs, fit_all_goals, fit_lr_curve, fit_tradeoff, noise_scale_summary, steps_by_lr

B = 2.0 ** np.arange(2, 12)          # 4 .. 2048
S_MIN, B_CRIT = 200.0, 300.0
E_MIN = S_MIN * B_CRIT


def draw(batch_sizes, sigma, seed, s_min=S_MIN, b_crit=B_CRIT):
    rng = np.random.default_rng(seed)
    b = np.asarray(batch_sizes, dtype=float)
    return s_min * (1 + b_crit / b) * np.exp(sigma * rng.standard_normal(b.size))


# --------------------------------------------------------------------------- the fit


def test_fit_recovers_truth_on_noiseless_and_low_noise_data():
    exact = fit_tradeoff(B, S_MIN * (1 + B_CRIT / B))
    assert exact.identified
    assert exact.s_min == pytest.approx(S_MIN, rel=1e-6)
    assert exact.e_min == pytest.approx(E_MIN, rel=1e-6)
    assert exact.b_crit == pytest.approx(B_CRIT, rel=1e-6)
    assert exact.resid_rms < 1e-6
    noisy = fit_tradeoff(B, draw(B, 0.02, seed=1))
    assert noisy.b_crit == pytest.approx(B_CRIT, rel=0.08)
    assert noisy.s_min == pytest.approx(S_MIN, rel=0.05)
    assert noisy.b_crit_ci[0] < noisy.b_crit < noisy.b_crit_ci[1]
    assert noisy.predict_steps(noisy.b_crit) == pytest.approx(2 * noisy.s_min)


@pytest.mark.parametrize("batch_sizes,sigma", [(B, 0.1), (B[::2], 0.2)])
def test_intervals_cover_the_truth_at_about_their_nominal_rate(batch_sizes, sigma):
    n_seeds = 200
    covered = np.zeros(3)
    log_estimates, log_ses = [], []
    for seed in range(n_seeds):
        fit = fit_tradeoff(batch_sizes, draw(batch_sizes, sigma, seed), level=0.95)
        assert fit.identified, fit.message
        covered += [fit.s_min_ci[0] <= S_MIN <= fit.s_min_ci[1],
                    fit.e_min_ci[0] <= E_MIN <= fit.e_min_ci[1],
                    fit.b_crit_ci[0] <= B_CRIT <= fit.b_crit_ci[1]]
        log_estimates.append(np.log([fit.s_min, fit.e_min, fit.b_crit]))
        log_ses.append([fit.s_min_log_se, fit.e_min_log_se, fit.b_crit_log_se])
    rate = covered / n_seeds
    assert np.all((rate >= 0.88) & (rate <= 0.99)), rate
    # unbiased in log space up to noise: the median estimate is near the truth
    assert np.exp(np.median(log_estimates, axis=0)) == pytest.approx([S_MIN, E_MIN, B_CRIT], rel=0.1)
    # the stated standard errors match the spread over seeds (this catches a wrong delta method
    # for B_crit, e.g. a dropped covariance term, that coverage alone over 200 seeds may miss)
    ratio = np.std(log_estimates, axis=0) / np.sqrt(np.mean(np.square(log_ses), axis=0))
    assert np.all((ratio > 0.88) & (ratio < 1.12)), ratio


def test_bootstrap_interval_is_close_to_the_jacobian_interval():
    fit = fit_tradeoff(B, draw(B, 0.1, seed=3), n_bootstrap=300, seed=0)
    lo, hi = fit.b_crit_boot_ci
    assert lo < fit.b_crit < hi
    jac_width = math.log(fit.b_crit_ci[1] / fit.b_crit_ci[0])
    assert 0.5 < math.log(hi / lo) / jac_width < 1.5
    assert math.isnan(fit_tradeoff(B, draw(B, 0.1, seed=3)).b_crit_boot_ci[0])  # only when asked


def test_fewer_than_three_batch_sizes_is_not_identified():
    fit = fit_tradeoff([64, 64, 128], [300, 310, 200])
    assert not fit.identified
    assert math.isnan(fit.b_crit) and math.isnan(fit.s_min)
    assert "at least 3" in fit.message


def test_data_outside_the_tradeoff_are_not_identified():
    flat = fit_tradeoff(B, np.full(B.size, 100.0))        # no benefit from larger B
    assert not flat.identified and "below the smallest" in flat.message
    linear = fit_tradeoff(B, 1e6 / B)                     # perfect scaling at every B
    assert not linear.identified and "above the largest" in linear.message
    assert math.isnan(flat.b_crit) and math.isnan(linear.b_crit)


@pytest.mark.parametrize("steps", [[100, np.nan, 50], [100, -5, 50], [100, 0, 50]])
def test_bad_steps_are_refused(steps):
    with pytest.raises(ValueError, match="finite and > 0"):
        fit_tradeoff([16, 32, 64], steps)


def test_lr_curve_recovers_eps_max_and_b_noise():
    lrs = 0.5 / (1 + 64 / B) * np.exp(0.05 * np.random.default_rng(0).standard_normal(B.size))
    fit = fit_lr_curve(B, lrs)
    eps_max, b_noise = fit
    assert eps_max == pytest.approx(0.5, rel=0.1)
    assert b_noise == pytest.approx(64, rel=0.25)
    assert fit.b_noise_ci[0] < 64 < fit.b_noise_ci[1]
    assert not fit_lr_curve(B, np.full(B.size, 0.1)).identified


# --------------------------------------------------------------------------- best runs


def runs_frame(table, goal="err<=0.1", threshold=0.1):
    """Rows (batch_size, lr, steps or None) -> a load_sweep-like frame for one goal."""
    rows = []
    for i, (b, lr, steps, *rest) in enumerate(table):
        rows.append({"task": "t", "optimizer": "sgd", "goal": goal, "goal_metric": "err",
                     "goal_threshold": threshold, "batch_size": b, "lr": lr,
                     "seed": rest[0] if rest else 0, "status": rest[1] if len(rest) > 1 else "completed",
                     "run_id": f"r{i}", "run_name": f"B{b}_lr{lr}_s{rest[0] if rest else 0}",
                     "reached": steps is not None, "steps": np.nan if steps is None else float(steps),
                     "b_simple": 10.0 * (i + 1) if steps is not None else np.nan})
    return pd.DataFrame(rows)


def test_best_run_is_the_fewest_steps_and_edges_are_flagged():
    df = runs_frame([
        (16, 0.1, 400), (16, 0.2, 500), (16, 0.4, None),      # best at the low edge
        (32, 0.1, 300), (32, 0.2, 250), (32, 0.4, 280),       # interior
        (64, 0.1, 300), (64, 0.2, 200), (64, 0.4, 150),       # best at the high edge
        (128, 0.4, 120),                                      # one lr only
    ])
    best = best_runs(df).set_index("batch_size")
    assert best.loc[16, "lr"] == 0.1 and best.loc[16, "steps"] == 400
    assert best.loc[32, "lr"] == 0.2 and best.loc[32, "steps"] == 250
    assert best.loc[64, "lr"] == 0.4 and best.loc[64, "examples"] == 64 * 150
    assert best.loc[16, "lr_edge"] == "low" and "downwards" in best.loc[16, "warnings"]
    assert best.loc[64, "lr_edge"] == "high" and "upwards" in best.loc[64, "warnings"]
    assert not best.loc[32, "lr_at_grid_edge"] and best.loc[32, "warnings"] == ""
    assert best.loc[128, "lr_edge"] == "single" and "not tuned" in best.loc[128, "warnings"]
    assert best.loc[32, "n_lrs"] == 3 and best.loc[32, "lr_grid_min"] == 0.1 and best.loc[32, "lr_grid_max"] == 0.4
    assert best.loc[32, "run_name"] == "B32_lr0.2_s0"
    fits = fit_all_goals(best.reset_index())
    assert "widen the grid upwards at B=64" in fits["warnings"].iloc[0]
    assert "widen the grid downwards at B=16" in fits["warnings"].iloc[0]


def test_a_tie_goes_to_an_lr_inside_the_grid():
    df = runs_frame([(32, 0.1, 300), (32, 0.2, 250), (32, 0.4, 250), (32, 0.8, 400)])
    best = best_runs(df).iloc[0]
    assert best["lr"] == 0.2 and best["n_tied"] == 2 and not best["lr_at_grid_edge"]
    edge_tie = best_runs(runs_frame([(32, 0.1, 300), (32, 0.2, 250), (32, 0.4, 250)])).iloc[0]
    assert edge_tie["lr"] == 0.2  # 0.4 is the edge: the interior 0.2 is preferred


def test_seeds_are_combined_by_their_median_and_failed_runs_do_not_widen_the_grid():
    df = runs_frame([
        (32, 0.1, 300, 0), (32, 0.1, 320, 1), (32, 0.1, 900, 2),   # median 320
        (32, 0.2, 200, 0), (32, 0.2, None, 1), (32, 0.2, None, 2),  # mostly unreached: not a candidate
        (32, 0.05, 500, 0),
        (32, 0.4, None, 0, "failed"),                              # crashed: not part of the grid
    ])
    cand = steps_by_lr(df).set_index("lr")
    assert cand.loc[0.1, "steps"] == 320 and cand.loc[0.1, "n_seeds"] == 3
    assert not cand.loc[0.2, "reached"]
    best = best_runs(df).iloc[0]
    assert best["lr"] == 0.1 and best["steps"] == 320 and best["run_name"] == "B32_lr0.1_s1"
    assert best["lr_grid_max"] == 0.2 and best["n_lrs"] == 3 and not best["lr_at_grid_edge"]


def test_goal_reached_by_no_run_gives_a_row_and_a_warning_not_a_number():
    df = pd.concat([runs_frame([(b, 0.1, 100 * (1 + 64 / b)) for b in (16, 32, 64, 128, 256)]),
                    runs_frame([(b, 0.1, None) for b in (16, 32, 64, 128, 256)], goal="err<=0.01", threshold=0.01)],
                   ignore_index=True)
    best = best_runs(df)
    hard = best[best["goal"] == "err<=0.01"]
    assert len(hard) == 5 and not hard["reached"].any() and hard["steps"].isna().all()
    fits = fit_all_goals(best).set_index("goal")
    assert fits.loc["err<=0.1", "identified"]
    assert not fits.loc["err<=0.01", "identified"] and math.isnan(fits.loc["err<=0.01", "b_crit"])
    assert "no run reached this goal" in fits.loc["err<=0.01", "warnings"]
    assert list(fits.index) == ["err<=0.1", "err<=0.01"]  # easiest first


def test_goal_warnings_few_batch_sizes_one_sided_and_poor_fit():
    few = fit_all_goals(best_runs(runs_frame([(16, 0.1, 500), (32, 0.1, 300)]))).iloc[0]
    assert not few["identified"] and "only 2 batch size(s): no fit" in few["warnings"]
    # B_crit = 2000 is above every batch size but one: the large-B side is extrapolated
    one_sided = fit_all_goals(best_runs(runs_frame(
        [(b, 0.1, s) for b, s in zip(B, draw(B, 0.02, 5, b_crit=2000))]))).iloc[0]
    assert "above B_crit" in one_sided["warnings"] and "add larger batch sizes" in one_sided["warnings"]
    assert "below B_crit" not in one_sided["warnings"]
    bumpy = fit_all_goals(best_runs(runs_frame(
        [(b, 0.1, s) for b, s in zip(B, draw(B, 0.5, 7))]))).iloc[0]
    assert "poor fit" in bumpy["warnings"]
    good = fit_all_goals(best_runs(runs_frame([(b, 0.1, s) for b, s in zip(B, draw(B, 0.02, 5))]))).iloc[0]
    assert "poor fit" not in good["warnings"] and "B_crit" not in good["warnings"]


def test_b_simple_is_the_median_over_the_best_runs_and_names_them():
    df = runs_frame([(16, 0.1, 500), (16, 0.2, 600), (32, 0.1, 300), (64, 0.1, 200)])
    df["b_simple"] = [100.0, 999.0, 120.0, 140.0]           # 999 is not a best run
    fits = fit_all_goals(best_runs(df)).iloc[0]
    assert fits["b_simple"] == 120.0 and fits["b_simple_n"] == 3
    assert fits["b_simple_batch_sizes"] == "16 32 64"
    assert fits["b_simple_runs"] == "B16_lr0.1_s0;B32_lr0.1_s0;B64_lr0.1_s0"


def test_dominated_points_are_not_on_the_front():
    best = best_runs(runs_frame([(16, 0.1, 300), (32, 0.1, 200), (64, 0.1, 210)])).set_index("batch_size")
    # B=64 takes more steps and more examples than B=32
    assert best["on_front"].to_dict() == {16: True, 32: True, 64: False}


def test_plain_table_without_lr_picks_the_fewest_steps_per_batch_size():
    df = pd.DataFrame({"goal": ["g"] * 4, "batch_size": [8, 8, 16, 32], "steps": [90, 80, 50, 30]})
    best = best_runs(df).set_index("batch_size")
    assert best.loc[8, "steps"] == 80 and math.isnan(best.loc[8, "lr"])
    assert not best["lr_at_grid_edge"].any()


def test_lr_fit_on_a_grid_keeps_the_grid_resolution_in_its_interval():
    # a grid centred on eps(B) = 1/(1 + 64/B): the middle lr wins at every B, so the best lrs
    # fit the curve exactly; the interval must still reflect the factor-2 grid, not collapse
    rows = [(b, 2.0 ** k / (1 + 64 / b), 100 * (1 + 64 / b) * (1 + 0.3 * abs(k)))
            for b in B for k in (-1, 0, 1)]
    fits = fit_all_goals(best_runs(runs_frame(rows))).iloc[0]
    assert fits["lr_grid_factor"] == pytest.approx(2.0)
    assert fits["lr_b_noise"] == pytest.approx(64, rel=1e-6)
    assert fits["lr_b_noise_high"] / fits["lr_b_noise_low"] > 1.5
    assert "same place in its grid" in fits["warnings"]
    exact = fit_lr_curve(B, 1 / (1 + 64 / B))            # no grid given: no floor
    assert exact.b_noise_ci[1] / exact.b_noise_ci[0] == pytest.approx(1, abs=1e-3)


def test_goals_reached_in_very_few_steps_are_listed_and_not_fitted():
    steps = draw(B, 0.02, 5, s_min=4)
    fits = fit_all_goals(best_runs(runs_frame([(b, 0.1, s) for b, s in zip(B, steps)]))).iloc[0]
    few = B[steps < 20]
    assert len(few) >= 3 and "fewer than 20 steps at B=" in fits["warnings"]
    assert fits["too_few_steps_at"] == " ".join(f"{b:g}" for b in few)
    assert fits["n_batch_sizes"] == len(B) - len(few)  # only the resolved points are fitted
    ok = fit_all_goals(best_runs(runs_frame([(b, 0.1, s) for b, s in zip(B, draw(B, 0.02, 5))]))).iloc[0]
    assert "fewer than 20 steps" not in ok["warnings"] and ok["n_batch_sizes"] == len(B)


def test_censored_goals_are_reached_but_not_fitted():
    """A goal met before its first valid measurement has no step: the best lr at that B is the
    censored one (faster than any measured), it is named, and the fit leaves it out."""
    rows = [(b, lr, 100 * (1 + 64 / b) * (1 + abs(k))) for b in B for k, lr in enumerate((0.1, 0.2))]
    df = runs_frame(rows)
    df["censored"] = False
    censored = (df["batch_size"] == 2048) & (df["lr"] == 0.2)
    df.loc[censored, ["censored", "steps"]] = [True, np.nan]
    best = best_runs(df).set_index("batch_size")
    assert best.loc[2048, "censored"] and best.loc[2048, "reached"] and math.isnan(best.loc[2048, "steps"])
    assert best.loc[2048, "lr"] == 0.2 and not best.loc[2048, "on_front"]
    assert "censored" in best.loc[2048, "warnings"]
    fits = fit_all_goals(best.reset_index()).iloc[0]
    assert fits["censored_at"] == "2048" and fits["n_batch_sizes"] == len(B) - 1
    assert "censored" in fits["warnings"]
    assert fits["b_crit"] == pytest.approx(64, rel=1e-3)


def probed_runs(truth_b, ses, seed, truth_t=5.0):
    """Runs whose probed |G|^2 (truth tr(Sigma)/truth_b) has the given standard errors."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, se in enumerate(ses):
        g = truth_t / truth_b + se * rng.standard_normal()
        rows.append({"batch_size": 2 ** (i + 3), "run_name": f"r{i}", "grad_sq_norm": g, "grad_sq_norm_se": se,
                     "trace_sigma": truth_t, "b_simple": truth_t / g if g > 0 else np.nan,
                     "b_simple_path": 50.0 + i, "b_simple_init": 30.0})
    return pd.DataFrame(rows)


def test_b_simple_at_a_goal_is_the_median_over_runs_with_an_interval_that_covers():
    """Runs probed at parameters with the same B_simple: the median over them and its bootstrap
    interval cover the truth at about the nominal rate (within binomial noise of 100 trials)."""
    covered = 0
    for seed in range(100):
        summary = noise_scale_summary(probed_runs(500.0, [0.0008] * 9, seed), seed=seed)
        assert summary["b_simple_resolved"] and summary["b_simple_n"] == 9
        covered += summary["b_simple_low"] <= 500.0 <= summary["b_simple_high"]
    assert 85 <= covered <= 100, covered


def test_an_unresolved_run_counts_with_its_lower_bound_and_can_make_the_median_a_bound():
    runs = probed_runs(500.0, [0.0005] * 3, seed=1)
    flat = probed_runs(1e5, [0.001], seed=2).assign(batch_size=1024, run_name="flat")  # |G|^2 ~ 0: unresolved
    few = noise_scale_summary(pd.concat([runs, flat], ignore_index=True))
    assert few["b_simple_n"] == 4 and few["b_simple_unresolved_runs"] == 1  # kept, not dropped
    assert few["b_simple_resolved"] and few["b_simple_max"] > 2000  # its bound lies above the median
    many = noise_scale_summary(probed_runs(500.0, [0.0005, 0.5, 0.5, 0.5], seed=1))
    assert many["b_simple_unresolved_runs"] == 3 and not many["b_simple_resolved"]
    fits = fit_all_goals(best_runs(runs_frame([(b, 0.1, 100 * (1 + 64 / b)) for b in B])).assign(
        grad_sq_norm=0.0001, grad_sq_norm_se=0.05, trace_sigma=5.0)).iloc[0]
    assert "not resolved" in fits["warnings"] and "at least" in fits["warnings"]


def test_a_value_from_too_few_measurements_is_not_counted():
    # one or two measurements: a standard error that means nothing, and a value that, when it
    # looks resolved, is so because its |G|^2 came out large, i.e. B_simple small
    runs = probed_runs(500.0, [0.0005] * 3, seed=1).assign(noise_updates=32)
    lone = runs.iloc[[0]].assign(run_name="lone", batch_size=1024, grad_sq_norm_se=1e-6, b_simple=5.0, noise_updates=2)
    summary = noise_scale_summary(pd.concat([runs, lone], ignore_index=True))
    assert summary["b_simple_n"] == 3 and "lone" not in summary["b_simple_runs"]
    assert summary["b_simple_min"] > 100  # the 5.0 did not pull the median down
    assert noise_scale_summary(pd.concat([runs, lone.assign(noise_updates=8)]))["b_simple_n"] == 4  # 8 is enough
    assert noise_scale_summary(pd.concat([runs, lone.assign(noise_updates=np.nan)]))["b_simple_n"] == 4  # unknown


def test_path_and_initial_noise_scales_are_medians_over_the_best_runs():
    summary = noise_scale_summary(probed_runs(500.0, [0.001] * 3, seed=0))
    assert summary["b_simple_path"] == 51.0 and summary["b_simple_path_min"] == 50.0
    assert summary["b_simple_init"] == 30.0


def test_a_b_noise_path_average_counts_only_where_it_is_resolved():
    """B_noise's path average carries a standard error: a run whose error exceeds a quarter of its
    value (B_noise measured too rarely) is left out of the median, not averaged in."""
    runs = probed_runs(500.0, [0.001] * 4, seed=0).assign(
        b_noise_path=[200.0, 210.0, 20.0, 5000.0], b_noise_path_se=[20.0, 40.0, 30.0, 4000.0])
    summary = noise_scale_summary(runs)
    assert summary["b_noise_path"] == 205.0
    assert (summary["b_noise_path_min"], summary["b_noise_path_max"]) == (200.0, 210.0)
    unresolved = noise_scale_summary(runs.assign(b_noise_path_se=1e4))
    assert math.isnan(unresolved["b_noise_path"])


def seeded_sweep(seed, n_seeds, sigma=0.15, lrs=(0.5, 0.71, 1.0, 1.41, 2.0)):
    """Runs from the model with seed noise sigma on ln S and a quadratic lr penalty around lr 1."""
    rng = np.random.default_rng(seed)
    rows = []
    for b in B:
        for lr in lrs:
            for s in range(n_seeds):
                steps = S_MIN * (1 + B_CRIT / b) * np.exp(0.5 * np.log(lr) ** 2 + sigma * rng.standard_normal())
                rows.append((b, lr, steps, s))
    return runs_frame(rows)


def test_bootstrap_over_seeds_covers_the_truth_and_holds_the_winners_curse():
    """With 3 seeds per (B, lr) and seed noise of 15% on each step count, the interval from
    resampling seeds and picking the best lr again covers the truth about as often as it claims;
    picking the best of 5 noisy lrs biases S low (the winner's curse), which it must not hide."""
    covered, widths = 0, []
    trials = 30
    for seed in range(trials):
        runs = seeded_sweep(seed, n_seeds=3)
        fits = fit_all_goals(best_runs(runs), n_bootstrap=60, runs=runs, seed=seed).iloc[0]
        assert fits["n_seed_resamples"] >= 30
        covered += fits["b_crit_seed_low"] <= B_CRIT <= fits["b_crit_seed_high"]
        widths.append(np.log(fits["b_crit_seed_high"] / fits["b_crit_seed_low"]))
    assert covered / trials >= 0.8, covered
    single = fit_all_goals(best_runs(seeded_sweep(0, n_seeds=1)), n_bootstrap=60,
                           runs=seeded_sweep(0, n_seeds=1)).iloc[0]
    assert math.isnan(single["b_crit_seed_low"])  # one seed: nothing to resample
    assert np.isfinite(single["b_crit_boot_low"])  # the residual bootstrap instead


def test_exact_data_still_get_an_interval_as_wide_as_the_step_resolution():
    # points exactly on a hyperbola fit with zero residual: the table must not claim B_crit exactly
    fits = fit_all_goals(best_runs(runs_frame([(b, 0.1, 40 * (1 + 192 / b)) for b in B]))).iloc[0]
    assert fits["b_crit"] == pytest.approx(192)
    assert fits["b_crit_high"] / fits["b_crit_low"] > 1.01
