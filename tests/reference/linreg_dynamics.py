r"""Exact expected-loss dynamics of minibatch SGD (and heavy-ball momentum) on the `linreg` task.

An independent reference for the critbatch pipeline: it imports nothing from critbatch. The
problem is given as numpy arrays (the spectrum lambda_i and w*); `linreg_problem` rebuilds the
arrays the `linreg` task uses, with torch's generator, so the numbers match.

Problem. x ~ N(0, Lambda), Lambda = diag(lambda_i); y = x.w* + n, n ~ N(0, sigma^2) independent;
per-example loss (x.w - y)^2 / 2; the model w starts at zero; every step draws a fresh batch of B
examples. With d = w - w*, the per-example gradient is x (x.d - n) and the batch gradient is
g = (1/B) sum_b x_b (x_b.d - n_b). The loss is L(w) = (d.Lambda d + sigma^2) / 2, its minimum
sigma^2 / 2, and the excess loss d.Lambda d / 2.

Gradient moments (conditional on d). E[g] = Lambda d. By Isserlis' theorem
E[x x^T d d^T x x^T] = Lambda (d.Lambda d) + 2 Lambda d d^T Lambda, and E[n^2 x x^T] = sigma^2 Lambda,
so the per-example covariance is
    Sigma(d) = Lambda (d.Lambda d + sigma^2) + Lambda d d^T Lambda
and the batch gradient is g = Lambda d + xi with E[xi | d] = 0, E[xi xi^T | d] = Sigma(d) / B.
Its diagonal is Sigma_ii = lambda_i (d.Lambda d + sigma^2) + lambda_i^2 d_i^2 (Lambda is diagonal,
so (Lambda d d^T Lambda)_ii = lambda_i^2 d_i^2 involves d_i alone).

Plain SGD, d' = d - lr g. With M = E[d d^T]:
    M' = (I - lr Lambda) M (I - lr Lambda) + (lr^2 / B) E[Sigma(d)]
       = (I - lr Lambda) M (I - lr Lambda) + (lr^2 / B) [Lambda (tr(Lambda M) + sigma^2) + Lambda M Lambda].
Because Lambda is diagonal, the diagonal m_i = M_ii closes on itself (tr(Lambda M) = sum_j lambda_j m_j
and (Lambda M Lambda)_ii = lambda_i^2 m_i):
    m_i' = m_i (1 - lr lambda_i)^2 + (lr^2 / B) [lambda_i (sum_j lambda_j m_j + sigma^2) + lambda_i^2 m_i],
m_i(0) = w*_i^2 (zero init), and E[excess loss] = sum_i lambda_i m_i / 2. All coefficients are >= 0
and grow with 1/B, so by induction m_t is entrywise non-increasing in B at any fixed lr and t:
S(B, lr) is non-increasing in B, and every S(B, lr) >= S(inf, lr) (gradient descent, the recursion
without its 1/B term).

Heavy ball as torch.optim.SGD(momentum=mu) (dampening 0, not Nesterov; torch's first-step
buf = g equals buf = mu * 0 + g): v' = mu v + g, d' = d - lr v', with v(0) = 0. Per coordinate,
with a_i = E[d_i^2], b_i = E[d_i v_i], c_i = E[v_i^2], and s_i = E[xi_i^2] = Sigma_ii / B in
expectation, s_i = (1/B) [lambda_i (sum_j lambda_j a_j + sigma^2) + lambda_i^2 a_i]
(xi is fresh, so it is uncorrelated with d and v):
    c_i' = E[v_i'^2]   = mu^2 c_i + 2 mu lambda_i b_i + lambda_i^2 a_i + s_i
    e_i  = E[d_i v_i'] = mu b_i + lambda_i a_i
    b_i' = E[d_i' v_i'] = e_i - lr c_i'
    a_i' = E[d_i'^2]   = a_i - 2 lr e_i + lr^2 c_i'
a_i(0) = w*_i^2, b_i(0) = c_i(0) = 0; coupled across coordinates only through sum_j lambda_j a_j.
With mu = 0 it reduces to the SGD recursion above.

Steps to a goal: the first step t at which the expected excess loss is <= goal, interpolated
linearly between steps t-1 and t (so fractional); inf if not reached within max_steps, or if the
expected total loss first exceeds `diverge_ratio` times its initial value.

The limits of S(B) = S_min + E_min / B (McCandlish et al. 2018, eq. 2.11):
  * S_min = lim_{B -> inf} S_opt(B): the recursion without its 1/B term (gradient descent, or
    heavy ball without noise) at its best lr. Exact, from the same recursion.
  * E_min = lim_{B -> 0} B S_opt(B). With lr = eta B and examples tau = B t, one step changes m by
    O(B), and as B -> 0 the recursion becomes the linear ODE
        dm/dtau = K m + eta^2 sigma^2 lambda,   K = diag(-2 eta lambda + eta^2 lambda^2) + eta^2 lambda lambda^T
    (K is symmetric, so m(tau) = m_inf + V exp(D tau) V^T (m(0) - m_inf) from eigh(K)). E_min is the
    least tau at which lambda.m(tau)/2 reaches the goal, minimised over eta. Exact, in that limit.
    For heavy ball the momentum buffer averages over ~1/(1-mu) steps, a vanishing span of tau as
    B -> 0, and the limit is the same ODE with eta_eff = eta / (1 - mu): E_min does not depend on mu.
  * B_crit = E_min / S_min from these limits; and, separately, S_min, E_min, B_crit from a fit of
    S = S_min + E_min / B (least squares on ln S) to S_opt at the batch sizes asked for. The exact
    S_opt(B) is not exactly a hyperbola, so the two differ somewhat.

Gradient noise scales (the paper's B_simple = tr(Sigma)/|G|^2, B_noise = tr(H Sigma)/(G.H G), H = Lambda):
    B_simple = tr(Lambda)(d.Lambda d + sigma^2)/|Lambda d|^2 + 1,
    B_noise  = tr(Lambda^2)(d.Lambda d + sigma^2)/(d.Lambda^3 d) + 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize

#: the expected total loss above this multiple of its initial value counts as diverged
DIVERGE_RATIO = 1e10
#: default lr grid: this many points per factor 2
PER_OCTAVE = 8


# ---------------------------------------------------------------------------------------------
# The problem


def linreg_problem(dim: int = 64, decay: float = 1.0, target_scale: float = 10.0,
                   problem_seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
    """(spectrum, w_star) as float64 numpy arrays, built exactly as the `linreg` task builds them:
    spectrum = arange(1, dim+1)^-decay, w* = target_scale * randn(dim) / sqrt(dim) from
    torch.Generator().manual_seed(problem_seed)."""
    import torch

    g = torch.Generator().manual_seed(problem_seed)
    spectrum = torch.arange(1, dim + 1, dtype=torch.float64) ** (-decay)
    w_star = target_scale * torch.randn(dim, generator=g, dtype=torch.float64) / dim ** 0.5
    return spectrum.numpy().copy(), w_star.numpy().copy()


def noise_scales(spectrum, w_star, noise_std, w=None) -> dict[str, float]:
    """Loss, excess loss, |G|^2, tr(Sigma), B_simple and B_noise at w (default: w = 0, the init)."""
    lam, w_star = _vector(spectrum), _vector(w_star)
    d = (np.zeros_like(w_star) if w is None else _vector(w)) - w_star
    s2 = float(noise_std) ** 2
    quad = float(d @ (lam * d))
    grad = lam * d
    grad_sq = float(grad @ grad)
    trace_sigma = float(lam.sum()) * (quad + s2) + grad_sq
    g_h_g = float(grad @ (lam * grad))
    trace_h_sigma = float((lam ** 2).sum()) * (quad + s2) + g_h_g
    return {"loss": 0.5 * (quad + s2), "excess_loss": 0.5 * quad, "grad_sq_norm": grad_sq,
            "trace_sigma": trace_sigma,
            "b_simple": trace_sigma / grad_sq if grad_sq > 0 else math.inf,
            "b_noise": trace_h_sigma / g_h_g if g_h_g > 0 else math.inf}


def _vector(x) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError("spectrum and w_star must be finite")
    return arr


def _check(spectrum, w_star, noise_std, momentum):
    lam, w_star = _vector(spectrum), _vector(w_star)
    if lam.shape != w_star.shape or lam.size == 0:
        raise ValueError(f"spectrum {lam.shape} and w_star {w_star.shape} must be equal, non-empty")
    if np.any(lam <= 0):
        raise ValueError("the spectrum must be > 0")
    if not noise_std >= 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    return lam, w_star, float(noise_std) ** 2, float(momentum)


def _rows(batch_size, lr):
    """Broadcast batch sizes (inf allowed: no gradient noise) and lrs to rows."""
    b, l = np.broadcast_arrays(np.asarray(batch_size, dtype=np.float64), np.asarray(lr, dtype=np.float64))
    if np.any(~(b > 0)) or np.any(~(l > 0)) or np.any(~np.isfinite(l)):
        raise ValueError("batch sizes must be > 0 (inf allowed) and lrs finite and > 0")
    return b.shape, 1.0 / b.reshape(-1), l.reshape(-1).copy()


# ---------------------------------------------------------------------------------------------
# The recursion


class _Moments:
    """The per-coordinate second moments of R independent settings (rows: one 1/B and lr each).

    SGD: m (R, n). Heavy ball: a = E[d^2], b = E[d v], c = E[v^2], each (R, n). `q` is
    sum_j lambda_j a_j per row, so the expected excess loss is q / 2. `d0`: the offset w - w* at
    the start (default -w*, the zero init); from a given parameter vector the diagonal m_i = d0_i^2
    closes on itself just the same (the off-diagonal of d0 d0^T never enters it)."""

    def __init__(self, lam, w_star, sigma2, inv_b, lr, momentum, d0=None):
        self.lam, self.sigma2, self.mu = lam, sigma2, momentum
        inv_b, lr, lam2 = inv_b[:, None], lr[:, None], (lam * lam)[None, :]
        rows = inv_b.shape[0]
        d0 = -w_star if d0 is None else d0
        self.a = np.repeat((d0 * d0)[None, :], rows, axis=0)
        if momentum == 0.0:
            self.c1 = (1.0 - lr * lam[None, :]) ** 2 + lr * lr * inv_b * lam2
            self.c2 = lr * lr * inv_b * lam[None, :]
        else:
            self.b = np.zeros_like(self.a)
            self.c = np.zeros_like(self.a)
            self.lr = lr
            self.ca = lam2 * (1.0 + inv_b)          # c' gets lambda^2 a + (1/B) lambda^2 a
            self.cn = inv_b * lam[None, :]          # c' gets (1/B) lambda (q + sigma^2)
            self.cb = 2.0 * momentum * lam[None, :]
        self.q = self.a @ lam

    def step(self) -> None:
        qs = (self.q + self.sigma2)[:, None]
        if self.mu == 0.0:
            a = self.c1 * self.a
            a += self.c2 * qs
            self.a = a
        else:
            mu, lr, a, b = self.mu, self.lr, self.a, self.b
            c = (mu * mu) * self.c
            c += self.cb * b
            c += self.ca * a
            c += self.cn * qs
            e = mu * b
            e += self.lam * a
            self.b = e - lr * c
            a = a - (2.0 * lr) * e
            a += (lr * lr) * c
            self.a, self.c = a, c
        self.q = self.a @ self.lam

    def keep(self, idx) -> None:
        names = ("a", "c1", "c2") if self.mu == 0.0 else ("a", "b", "c", "lr", "ca", "cn")
        for name in names:
            value = getattr(self, name)
            if value.shape[0] > 1 or name == "a":
                setattr(self, name, value[idx])
        self.q = self.q[idx]


def expected_excess_loss(spectrum, w_star, noise_std, batch_size, lr, steps: int,
                         momentum: float = 0.0, start=None) -> np.ndarray:
    """E[excess loss] after 0..steps steps: shape broadcast(batch_size, lr) + (steps + 1,).

    batch_size may be inf (gradient descent). Diverged settings read inf (not nan). `start`: the
    parameter vector w the runs start from (default 0); with momentum its buffer starts at 0."""
    lam, w_star, sigma2, mu = _check(spectrum, w_star, noise_std, momentum)
    shape, inv_b, lrs = _rows(batch_size, lr)
    d0 = None if start is None else _vector(start) - w_star
    if d0 is not None and d0.shape != w_star.shape:
        raise ValueError(f"start {d0.shape} must be shaped as w_star {w_star.shape}")
    moments = _Moments(lam, w_star, sigma2, inv_b, lrs, mu, d0)
    out = np.empty((lrs.size, int(steps) + 1))
    out[:, 0] = moments.q
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(1, int(steps) + 1):
            moments.step()
            out[:, t] = moments.q
        out *= 0.5
        out[~np.isfinite(out)] = np.inf
    return out.reshape(shape + (int(steps) + 1,))


def _first_crossings(lam, w_star, sigma2, inv_b, lrs, mu, goals, max_steps, groups=None,
                     diverge_ratio=DIVERGE_RATIO, interpolate=True) -> np.ndarray:
    """(R, G) fractional first steps at which row r's expected excess loss is <= goals[g].

    inf: not within max_steps, or diverged first. With `groups` (an int label per row), a row
    stops once it can no longer beat the best crossing of its group at any goal it has not
    reached; those entries read nan ("slower than the group's best", never the minimum)."""
    moments = _Moments(lam, w_star, sigma2, inv_b, lrs, mu)
    n_rows, n_goals = lrs.size, goals.size
    out = np.full((n_rows, n_goals), np.inf)
    live = np.arange(n_rows)
    e_prev = 0.5 * moments.q
    done = e_prev[:, None] <= goals[None, :]
    out[done] = 0.0
    limit = diverge_ratio * (e_prev[0] + 0.5 * sigma2) - 0.5 * sigma2 if n_rows else 0.0
    if groups is not None:
        groups = np.asarray(groups)
        best = np.full((groups.max() + 1 if n_rows else 0, n_goals), np.inf)
        np.minimum.at(best, (np.repeat(groups, n_goals), np.tile(np.arange(n_goals), n_rows)),
                      np.where(done, 0.0, np.inf).reshape(-1))
        group_live = groups.copy()
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(1, int(max_steps) + 1):
            if live.size == 0:
                break
            moments.step()
            e = 0.5 * moments.q
            newly = ~done & (e[:, None] <= goals[None, :])
            if newly.any():
                r, g = np.nonzero(newly)
                if interpolate:
                    value = (t - 1) + (e_prev[r] - goals[g]) / (e_prev[r] - e[r])
                else:
                    value = np.full(r.size, float(t))
                out[live[r], g] = value
                done |= newly
                if groups is not None:
                    np.minimum.at(best, (group_live[r], g), value)
            dead = ~(e <= limit) | done.all(axis=1)   # diverged (or nan), or finished
            pruned = np.zeros_like(dead)
            if groups is not None:
                hopeless = done | (best[group_live] <= t)   # a later crossing is > t
                pruned = ~dead & hopeless.all(axis=1)
                if pruned.any():
                    rp = np.nonzero(pruned)[0]
                    sub = out[live[rp]]
                    sub[~done[rp]] = np.nan
                    out[live[rp]] = sub
            gone = dead | pruned
            if gone.any():
                keep = np.nonzero(~gone)[0]
                moments.keep(keep)
                live, done, e = live[keep], done[keep], e[keep]
                if groups is not None:
                    group_live = group_live[keep]
            e_prev = e
    return out


def steps_to_goal(spectrum, w_star, noise_std, batch_size, lr, goal, momentum: float = 0.0,
                  max_steps: int = 20000, diverge_ratio: float = DIVERGE_RATIO,
                  interpolate: bool = True) -> np.ndarray:
    """Fractional first step at which E[excess loss] <= goal (linear interpolation between steps;
    interpolate=False: the first whole step t with E[excess loss after t steps] <= goal).

    Shape broadcast(batch_size, lr), with a trailing goals axis when `goal` is an array. inf when
    the goal is not reached within max_steps, or when the expected total loss first exceeds
    diverge_ratio x its initial value."""
    lam, w_star, sigma2, mu = _check(spectrum, w_star, noise_std, momentum)
    shape, inv_b, lrs = _rows(batch_size, lr)
    goals = np.atleast_1d(np.asarray(goal, dtype=np.float64))
    out = _first_crossings(lam, w_star, sigma2, inv_b, lrs, mu, goals, max_steps,
                           diverge_ratio=diverge_ratio, interpolate=interpolate)
    if np.ndim(goal) == 0:
        return out[:, 0].reshape(shape)
    return out.reshape(shape + goals.shape)


def _one_crossing(lam, w_star, sigma2, inv_b, lr, mu, goal, cap, limit, interpolate=True) -> float:
    """steps_to_goal for one setting and one goal, inf beyond `cap` steps (a lean loop)."""
    moments = _Moments(lam, w_star, sigma2, np.array([inv_b]), np.array([lr]), mu)
    e_prev = 0.5 * float(moments.q[0])
    if e_prev <= goal:
        return 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        for t in range(1, int(cap) + 1):
            moments.step()
            e = 0.5 * float(moments.q[0])
            if e <= goal:
                return (t - 1) + (e_prev - goal) / (e_prev - e) if interpolate else float(t)
            if not e <= limit:
                return math.inf
            e_prev = e
    return math.inf


# ---------------------------------------------------------------------------------------------
# The best lr per batch size


def default_lrs(spectrum, momentum: float = 0.0, per_octave: int = PER_OCTAVE,
                octaves: int = 16) -> np.ndarray:
    """A geometric lr grid, 2^(1/per_octave) apart, from 4(1+mu)/lambda_max (beyond the
    gradient-descent stability limit 2(1+mu)/lambda_max, so the best lr is never at the top)
    down by a factor 2^octaves."""
    top = 4.0 * (1.0 + momentum) / float(np.max(_vector(spectrum)))
    return top * 2.0 ** (-np.arange(per_octave * octaves, -1, -1) / per_octave)


@dataclass
class BestSteps:
    """Per (batch size, goal): the least steps to the goal over lr, and that lr.

    `steps`/`lr` are refined by a bounded 1-D minimisation in ln lr between the grid neighbours
    of the grid's best; `grid_steps`/`grid_lr` are the grid's best. `at_edge` flags a best at
    either end of the grid (then widen it)."""

    batch_sizes: np.ndarray
    goals: np.ndarray
    steps: np.ndarray        # (n_batch_sizes, n_goals)
    lr: np.ndarray
    grid_steps: np.ndarray
    grid_lr: np.ndarray
    at_edge: np.ndarray
    lrs: np.ndarray
    momentum: float


def best_steps(spectrum, w_star, noise_std, batch_size, goal, lrs=None, momentum: float = 0.0,
               max_steps: int = 20000, refine: bool = True, xatol: float = 1e-4,
               diverge_ratio: float = DIVERGE_RATIO, interpolate: bool = True) -> BestSteps:
    """min over lr of steps_to_goal, for each batch size (inf allowed) and goal (1-D arrays).

    The grid (default `default_lrs`) runs vectorised over lrs and batch sizes at once; each
    (batch size, lr) row stops as soon as it can no longer beat the best of its batch size."""
    lam, w_star, sigma2, mu = _check(spectrum, w_star, noise_std, momentum)
    bs = np.atleast_1d(np.asarray(batch_size, dtype=np.float64))
    goals = np.atleast_1d(np.asarray(goal, dtype=np.float64))
    grid = np.sort(np.asarray(default_lrs(lam, mu) if lrs is None else lrs, dtype=np.float64).ravel())
    n_b, n_l, n_g = bs.size, grid.size, goals.size
    inv_b = np.repeat(1.0 / bs, n_l)
    row_lr = np.tile(grid, n_b)
    groups = np.repeat(np.arange(n_b), n_l)
    cross = _first_crossings(lam, w_star, sigma2, inv_b, row_lr, mu, goals, max_steps,
                             groups=groups, diverge_ratio=diverge_ratio,
                             interpolate=interpolate).reshape(n_b, n_l, n_g)
    cross = np.where(np.isnan(cross), np.inf, cross)
    idx = np.argmin(cross, axis=1)                      # (n_b, n_g)
    grid_steps = np.take_along_axis(cross, idx[:, None, :], axis=1)[:, 0, :]
    grid_lr = grid[idx]
    at_edge = np.isfinite(grid_steps) & ((idx == 0) | (idx == n_l - 1))
    steps, best_lr = grid_steps.copy(), grid_lr.copy()
    limit = diverge_ratio * (0.5 * float(w_star @ (lam * w_star)) + 0.5 * sigma2) - 0.5 * sigma2
    if refine:
        for i in range(n_b):
            for g in range(n_g):
                if not np.isfinite(grid_steps[i, g]):
                    continue
                k = idx[i, g]
                lo = math.log(grid[max(k - 1, 0)])
                hi = math.log(grid[min(k + 1, n_l - 1)])
                if hi <= lo:
                    continue
                cap = min(int(max_steps), int(math.ceil(grid_steps[i, g])) + 1)
                penalty = 2.0 * cap + 2.0

                def f(x, i=i, g=g, cap=cap, penalty=penalty):
                    s = _one_crossing(lam, w_star, sigma2, 1.0 / bs[i], math.exp(x), mu, goals[g],
                                      cap, limit, interpolate)
                    return s if np.isfinite(s) else penalty

                res = optimize.minimize_scalar(f, bounds=(lo, hi), method="bounded",
                                               options={"xatol": xatol})
                if res.fun < steps[i, g]:
                    steps[i, g], best_lr[i, g] = float(res.fun), math.exp(res.x)
    return BestSteps(batch_sizes=bs, goals=goals, steps=steps, lr=best_lr, grid_steps=grid_steps,
                     grid_lr=grid_lr, at_edge=at_edge, lrs=grid, momentum=mu)


# ---------------------------------------------------------------------------------------------
# The small-batch limit: examples to the goal, E_min


def _ode_parts(lam, w_star, sigma2, etas):
    """For each eta: the eigen-rates D (K, n) and weights (K, n) and constant (K,) of
    excess(tau) = const + sum_k weight_k exp(D_k tau)."""
    etas = np.asarray(etas, dtype=np.float64).reshape(-1)
    n = lam.size
    e = etas[:, None]
    kmat = (etas ** 2)[:, None, None] * np.outer(lam, lam)[None, :, :]
    kmat[:, np.arange(n), np.arange(n)] += -2.0 * e * lam + e * e * lam * lam
    rates, vecs = np.linalg.eigh(kmat)
    forcing = (etas ** 2)[:, None] * sigma2 * lam[None, :]
    # m_inf = -K^{-1} f
    proj_f = np.einsum("kij,ki->kj", vecs, forcing)
    m_inf = -np.einsum("kij,kj->ki", vecs, proj_f / rates)
    proj_lam = np.einsum("kij,i->kj", vecs, lam)
    proj_dm = np.einsum("kij,ki->kj", vecs, (w_star ** 2)[None, :] - m_inf)
    weights = 0.5 * proj_lam * proj_dm
    const = 0.5 * m_inf @ lam
    return rates, weights, const


def small_batch_examples_to_goal(spectrum, w_star, noise_std, eta, goal,
                                 points: int = 2000) -> np.ndarray:
    """lim_{B->0} B * steps_to_goal(B, lr = eta*B): the examples tau at which the ODE's excess
    loss first reaches the goal. Shape eta's + (goals,) when goal is an array; inf if never."""
    lam, w_star, sigma2, _ = _check(spectrum, w_star, noise_std, 0.0)
    etas = np.atleast_1d(np.asarray(eta, dtype=np.float64)).reshape(-1)
    goals = np.atleast_1d(np.asarray(goal, dtype=np.float64))
    rates, weights, const = _ode_parts(lam, w_star, sigma2, etas)
    e0 = 0.5 * float(w_star @ (lam * w_star))
    abs_r = np.abs(rates)
    # a geometric grid of tau from well inside the fastest rate to far beyond the slowest
    lo = 1e-4 / abs_r.max(axis=1)
    hi = 60.0 / np.maximum(abs_r.min(axis=1), 1e-300)
    frac = np.linspace(0.0, 1.0, points)
    taus = np.exp(np.log(lo)[:, None] + frac[None, :] * np.log(hi / lo)[:, None])
    taus = np.concatenate([np.zeros((etas.size, 1)), taus], axis=1)          # (K, P+1)

    curve = np.empty_like(taus)                                              # (K, P+1)
    with np.errstate(over="ignore", invalid="ignore"):
        for k0 in range(0, etas.size, 8):                                    # chunks: memory
            sl = slice(k0, k0 + 8)
            curve[sl] = const[sl, None] + np.einsum(
                "kpj,kj->kp", np.exp(taus[sl, :, None] * rates[sl, None, :]), weights[sl])
    curve = np.where(np.isfinite(curve), curve, np.inf)
    out = np.full((etas.size, goals.size), np.inf)
    for g, goal_g in enumerate(goals):
        if e0 <= goal_g:
            out[:, g] = 0.0
            continue
        below = curve <= goal_g
        has = below.any(axis=1)
        j = np.argmax(below, axis=1)
        k = np.nonzero(has)[0]
        if k.size == 0:
            continue
        a, b = taus[k, j[k] - 1].copy(), taus[k, j[k]].copy()
        for _ in range(100):     # vectorised bisection on [a, b]: excess(a) > goal >= excess(b)
            mid = 0.5 * (a + b)
            val = _excess_at(rates[k], weights[k], const[k], mid)
            go_left = val <= goal_g
            b = np.where(go_left, mid, b)
            a = np.where(go_left, a, mid)
        out[k, g] = b
    if np.ndim(goal) == 0:
        out = out[:, 0]
    return out.reshape(np.shape(eta) + (() if np.ndim(goal) == 0 else goals.shape))


def _excess_at(rates, weights, const, tau):
    """The ODE's excess loss at one tau per eta: rates, weights (K, n); const, tau (K,)."""
    with np.errstate(over="ignore", invalid="ignore"):
        ex = const + np.sum(weights * np.exp(rates * tau[:, None]), axis=1)
    return np.where(np.isfinite(ex), ex, np.inf)


def default_etas(spectrum, per_octave: int = PER_OCTAVE, octaves: int = 16) -> np.ndarray:
    """lr-per-example (eta = lr/B) grid for the small-batch limit: from 2/lambda_max (the ODE is
    stable only for eta < 1/lambda_max, so the best eta is never at the top) down by 2^octaves."""
    top = 2.0 / float(np.max(_vector(spectrum)))
    return top * 2.0 ** (-np.arange(per_octave * octaves, -1, -1) / per_octave)


def min_examples(spectrum, w_star, noise_std, goal, etas=None, refine: bool = True,
                 xatol: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """Exact E_min per goal (the small-batch limit) and the best lr/B (eta) for plain SGD.

    For heavy ball the limit is the same, with lr/B = eta (1 - mu)."""
    lam, w_star, sigma2, _ = _check(spectrum, w_star, noise_std, 0.0)
    goals = np.atleast_1d(np.asarray(goal, dtype=np.float64))
    grid = np.sort(np.asarray(default_etas(lam) if etas is None else etas, dtype=np.float64).ravel())
    tau = small_batch_examples_to_goal(lam, w_star, noise_std, grid, goals)  # (K, G)
    idx = np.argmin(tau, axis=0)
    e_min, eta_best = tau[idx, np.arange(goals.size)].copy(), grid[idx].copy()
    if refine:
        for g in range(goals.size):
            if not np.isfinite(e_min[g]):
                continue
            k = idx[g]
            lo, hi = math.log(grid[max(k - 1, 0)]), math.log(grid[min(k + 1, grid.size - 1)])
            penalty = 2.0 * e_min[g] + 1.0

            def f(x, g=g, penalty=penalty):
                v = float(small_batch_examples_to_goal(lam, w_star, noise_std, math.exp(x), goals[g]))
                return v if np.isfinite(v) else penalty

            res = optimize.minimize_scalar(f, bounds=(lo, hi), method="bounded", options={"xatol": xatol})
            if res.fun < e_min[g]:
                e_min[g], eta_best[g] = float(res.fun), math.exp(res.x)
    return e_min, eta_best


# ---------------------------------------------------------------------------------------------
# The tradeoff: S(B) = S_min + E_min / B


def fit_hyperbola(batch_sizes, steps) -> tuple[float, float, float]:
    """(S_min, E_min, rms of ln S residuals): least squares of ln S on ln(S_min + E_min/B) over
    (ln S_min, ln E_min), started from a relative-error-weighted linear fit of S on 1/B."""
    b = np.asarray(batch_sizes, dtype=np.float64).ravel()
    s = np.asarray(steps, dtype=np.float64).ravel()
    ok = np.isfinite(b) & np.isfinite(s) & (s > 0) & (b > 0)
    b, s = b[ok], s[ok]
    if b.size < 3:
        return math.nan, math.nan, math.nan
    inv_b = 1.0 / b
    design = np.column_stack([np.ones_like(inv_b), inv_b]) / s[:, None]
    coef, *_ = np.linalg.lstsq(design, np.ones_like(s), rcond=None)
    s0 = coef[0] if coef[0] > 0 else 0.5 * s.min()
    e0 = coef[1] if coef[1] > 0 else 0.5 * (s * b).min()

    def resid(theta):
        return np.logaddexp(theta[0], theta[1] - np.log(b)) - np.log(s)

    res = optimize.least_squares(resid, np.log([s0, e0]), method="lm", xtol=1e-14, ftol=1e-14,
                                 gtol=1e-14)
    r = resid(res.x)
    return float(math.exp(res.x[0])), float(math.exp(res.x[1])), float(np.sqrt(np.mean(r * r)))


@dataclass
class CritBatch:
    """Exact tradeoff per goal. Arrays over goals unless said; `steps`/`lr` are (n_B, n_goals)."""

    goals: np.ndarray
    batch_sizes: np.ndarray
    momentum: float
    steps: np.ndarray          # S_opt(B) per (B, goal), exact expected dynamics at the best lr
    lr: np.ndarray             # its lr
    s_min_fit: np.ndarray      # from the fit of S = S_min + E_min/B over `batch_sizes`
    e_min_fit: np.ndarray
    b_crit_fit: np.ndarray
    fit_rms: np.ndarray        # rms residual of ln S in that fit
    s_min: np.ndarray          # exact: B -> inf (no gradient noise) at its best lr
    lr_s_min: np.ndarray
    e_min: np.ndarray          # exact: lim_{B->0} B S_opt(B) (the ODE limit), independent of mu
    eta_e_min: np.ndarray      # its best lr/B, for SGD (heavy ball: lr/B = eta (1 - mu))
    b_crit: np.ndarray         # e_min / s_min
    at_edge: bool              # a best lr sat at an end of its grid

    def table(self) -> str:
        lines = [f"momentum={self.momentum:g}",
                 f"{'goal':>6} {'S_min':>9} {'E_min':>10} {'B_crit':>8} | {'S_min_fit':>9} "
                 f"{'E_min_fit':>10} {'B_crit_fit':>10} {'rms':>6}"]
        for g, goal in enumerate(self.goals):
            lines.append(f"{goal:6g} {self.s_min[g]:9.2f} {self.e_min[g]:10.1f} {self.b_crit[g]:8.2f} | "
                         f"{self.s_min_fit[g]:9.2f} {self.e_min_fit[g]:10.1f} {self.b_crit_fit[g]:10.2f} "
                         f"{self.fit_rms[g]:6.3f}")
        lines.append(f"{'goal':>6} " + " ".join(f"{'B=' + format(b, 'g'):>16}" for b in self.batch_sizes)
                     + f" {'B=inf':>16}")
        for g, goal in enumerate(self.goals):
            cells = [f"{self.steps[i, g]:8.1f}@{self.lr[i, g]:<7.4f}" for i in range(self.batch_sizes.size)]
            cells.append(f"{self.s_min[g]:8.1f}@{self.lr_s_min[g]:<7.4f}")
            lines.append(f"{goal:6g} " + " ".join(f"{c:>16}" for c in cells))
        return "\n".join(lines)


def exact_b_crit(spectrum, w_star, noise_std, goals, batch_sizes, lrs=None, momentum: float = 0.0,
                 max_steps: int = 20000, refine: bool = True, interpolate: bool = True) -> CritBatch:
    """S_opt(B) at the best lr per (batch size, goal), the fit S = S_min + E_min/B to it, and the
    exact limits S_min (B -> inf), E_min (B -> 0) and B_crit = E_min/S_min."""
    lam, w_star, sigma2, mu = _check(spectrum, w_star, noise_std, momentum)
    goals = np.atleast_1d(np.asarray(goals, dtype=np.float64))
    bs = np.atleast_1d(np.asarray(batch_sizes, dtype=np.float64))
    best = best_steps(lam, w_star, noise_std, bs, goals, lrs=lrs, momentum=mu, max_steps=max_steps,
                      refine=refine, interpolate=interpolate)
    gd = best_steps(lam, w_star, noise_std, np.inf, goals, lrs=lrs, momentum=mu, max_steps=max_steps,
                    refine=refine, interpolate=interpolate)
    e_min, eta = min_examples(lam, w_star, noise_std, goals, refine=refine)
    fits = np.array([fit_hyperbola(bs, best.steps[:, g]) for g in range(goals.size)]).reshape(-1, 3)
    s_min = gd.steps[0]
    return CritBatch(goals=goals, batch_sizes=bs, momentum=mu, steps=best.steps, lr=best.lr,
                     s_min_fit=fits[:, 0], e_min_fit=fits[:, 1], b_crit_fit=fits[:, 1] / fits[:, 0],
                     fit_rms=fits[:, 2], s_min=s_min, lr_s_min=gd.lr[0], e_min=e_min, eta_e_min=eta,
                     b_crit=e_min / s_min, at_edge=bool(best.at_edge.any() or gd.at_edge.any()))


if __name__ == "__main__":   # the exact values for experiment=linreg_check (docs/results.md)
    import time

    spec, ws = linreg_problem()
    print("at initialisation:", {k: round(v, 2) for k, v in noise_scales(spec, ws, 1.0).items()})
    for mom in (0.0, 0.9):
        t0 = time.perf_counter()
        # the goals and batch sizes of conf/task/linreg.yaml and conf/sweep/linreg.yaml
        res = exact_b_crit(spec, ws, 1.0, [1.0, 0.3, 0.1, 0.03], [4, 16, 64, 256, 1024], momentum=mom)
        print(f"momentum {mom}:")
        print(res.table())
        print(f"({time.perf_counter() - t0:.2f} s)")
