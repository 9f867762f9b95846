"""Optimisers behind one call shape: ``minimize(name, objective, x0, scale, **options)``.

``objective`` has ``scalar(x) -> float`` (to minimise), ``residuals(x) -> array``
(whose squared norm it is, up to a constant) and ``residuals_many(xs)`` (the residuals of
several independent points, which it may evaluate concurrently: finite differences);
each optimiser uses what it needs. It may also have ``derivatives(x) -> {k: column}``:
Jacobian columns d residuals / d x_k it knows without new evaluations, which "lm" uses
instead of finite differences for those parameters.

- "cmaes": CMA-ES (pycma, N. Hansen's reference implementation): a global,
  derivative-free search with a wide capture range, for the coarse pyramid level.
- "least_squares": scipy's Levenberg-Marquardt (MINPACK) on the residuals with
  forward-difference Jacobians: the local refinement, a few iterations of 7
  evaluations near the optimum (measured 3x fewer evaluations than trust-region
  reflective and 10x fewer than Powell on tracking updates).
- "lm": a Levenberg-Marquardt of its own with a fixed budget of iterations (n + 1
  evaluations each) and the Gauss-Newton covariance of the result: the default
  refinement, whose cost is known in advance (fewer evaluations for the columns
  the objective's ``derivatives`` give). Given the Jacobian of a nearby problem
  (tracking: the previous frame's), it starts from it and updates it by Broyden's rule
  (one evaluation per iteration) while its steps lower the cost.
- "powell", "nelder-mead": scipy's derivative-free local methods (several hundred
  evaluations; kept for comparison).

``scale`` gives the typical step per parameter (deg, mm): the search runs in
x / scale so that a unit step means the same to every parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from guidance.registration.errors import RegistrationError

__all__ = ["OPTIMIZERS", "Objective", "OptimizeOutcome", "minimize", "profile_sd", "profile_vertex"]


class Objective(Protocol):
    def scalar(self, x: np.ndarray) -> float: ...

    def residuals(self, x: np.ndarray) -> np.ndarray: ...

    def residuals_many(self, xs: list[np.ndarray]) -> list[np.ndarray]: ...


@dataclass(frozen=True)
class OptimizeOutcome:
    """Best parameters, their cost, evaluations, iterations and why the search stopped.

    ``covariance`` (least squares only): Gauss-Newton covariance of x (deg, mm units
    squared), ``s^2 (J^T J)^-1`` with s^2 the residual variance per degree of freedom.
    ``jacobian`` ("lm" only): the last Jacobian of the residuals with respect to x / scale,
    to start a nearby problem from (``minimize(..., jacobian=...)``).
    """

    x: np.ndarray
    fun: float
    nfev: int
    nit: int
    stop_reason: str
    converged: bool
    covariance: np.ndarray | None = None
    jacobian: np.ndarray | None = None


def _cmaes(objective, x0, scale, *, sigma=1.0, popsize=12, max_iter=40, bound=None, seed=0, tol_fun=1e-4, **_):
    import cma  # imported here: pycma takes seconds to import (scipy.stats), and only this optimiser needs it

    options = {
        "popsize": popsize,
        "maxiter": max_iter,
        "seed": int(seed) + 1,  # pycma treats seed 0 as "random"
        "verbose": -9,
        "tolfun": tol_fun,
        "tolx": 1e-3,
        "CMA_stds": np.ones(len(x0)),
    }
    if bound is not None:
        options["bounds"] = [-bound, bound]
    es = cma.CMAEvolutionStrategy(np.asarray(x0, dtype=float) / scale, sigma, options)
    while not es.stop():
        candidates = es.ask()
        es.tell(candidates, [objective.scalar(np.asarray(c) * scale) for c in candidates])
    stop = es.stop()
    reason = ", ".join(f"{k}={v}" for k, v in stop.items())
    converged = any(k in stop for k in ("tolfun", "tolx", "tolfunhist", "tolstagnation", "tolflatfitness"))
    best = es.result.xbest if es.result.xbest is not None else es.result.xfavorite
    return OptimizeOutcome(
        x=np.asarray(best) * scale,
        fun=float(es.result.fbest),
        nfev=int(es.result.evaluations),
        nit=int(es.result.iterations),
        stop_reason=f"cmaes: {reason}",
        converged=converged,
    )


def _scipy(method):
    def run(objective, x0, scale, *, max_fev=200, xtol=1e-2, ftol=1e-5, initial_step=1.0, **_):
        import scipy.optimize

        options = {"maxfev": max_fev, "xtol": xtol, "ftol": ftol}
        if method == "Powell":
            options["direc"] = np.eye(len(x0)) * initial_step
        else:
            options = {"maxfev": max_fev, "xatol": xtol, "fatol": ftol,
                       "initial_simplex": np.vstack([np.zeros(len(x0)), np.eye(len(x0)) * initial_step])
                       + np.asarray(x0) / scale}
        res = scipy.optimize.minimize(lambda z: objective.scalar(z * scale), np.asarray(x0, dtype=float) / scale,
                                      method=method, options=options)
        return OptimizeOutcome(
            x=np.asarray(res.x) * scale,
            fun=float(res.fun),
            nfev=int(res.nfev),
            nit=int(res.get("nit", 0)),
            stop_reason=f"{method.lower()}: {res.message}",
            converged=bool(res.success),
        )

    return run


def _least_squares(objective, x0, scale, *, max_fev=10, xtol=1e-2, ftol=1e-4, diff_step=0.02, **_):
    """Levenberg-Marquardt (MINPACK) with forward-difference Jacobians; ``max_fev`` counts
    iterations of n + 1 evaluations each."""
    import scipy.optimize

    n = len(x0)
    res = scipy.optimize.least_squares(
        lambda z: objective.residuals(z * scale),
        np.asarray(x0, dtype=float) / scale,
        method="lm",
        diff_step=diff_step,
        xtol=xtol,
        ftol=ftol,
        gtol=1e-8,
        max_nfev=max_fev * (n + 1),
    )
    m = len(res.fun)
    variance = float(np.dot(res.fun, res.fun)) / max(m - n, 1)
    covariance_z = variance * np.linalg.pinv(res.jac.T @ res.jac)
    return OptimizeOutcome(
        x=np.asarray(res.x) * scale,
        fun=float(objective.scalar(res.x * scale)),
        nfev=int(res.nfev),
        nit=int(np.ceil(res.nfev / (n + 1))),
        stop_reason=f"least_squares: {res.message}",
        converged=res.status > 0,
        covariance=covariance_z * np.outer(scale, scale),
    )


def _jacobian(objective, z: np.ndarray, r: np.ndarray, scale: np.ndarray, diff_step: float) -> tuple[np.ndarray, int]:
    """Jacobian of the residuals with respect to z = x / scale at z (residuals r): the
    objective's known ``derivatives``, forward differences for the other parameters; and the
    evaluations that took."""
    known = getattr(objective, "derivatives", lambda x: {})(z * scale)
    unknown = [k for k in range(len(z)) if k not in known]
    J = np.empty((len(r), len(z)))
    for k, column in known.items():
        J[:, k] = column * scale[k]
    columns = objective.residuals_many([(z + diff_step * np.eye(len(z))[k]) * scale for k in unknown])
    for k, column in zip(unknown, columns):
        J[:, k] = (column - r) / diff_step
    return J, len(unknown)


def _levenberg_marquardt(objective, x0, scale, *, max_fev=10, xtol=1e-2, ftol=1e-4, diff_step=0.02,
                         max_retries=3, jacobian=None, **_):
    """Levenberg-Marquardt on the residuals with forward-difference Jacobians (step
    ``diff_step`` in units of ``scale``; the columns the objective's ``derivatives`` know are
    taken from it): at most ``max_fev`` iterations of n + 1 evaluations at most (plus one per
    rejected step), so its cost is known in advance. Stops
    when a step changes the cost by less than ``ftol`` (relative) or moves less than
    ``xtol`` (in units of ``scale``), or when no damping gives a lower cost.

    ``jacobian`` (residuals x n, with respect to x / scale; ignored when its shape does
    not fit): the Jacobian of a nearby problem, e.g. the previous frame's when tracking.
    Iterations start from it and update it by Broyden's rank-one rule, one evaluation
    each. When neither the first step nor half of it lowers the cost, the borrowed
    Jacobian misleads: forward differences take over. A later step that does not lower
    the cost ends the search as converged (in tracking, a fresh finite-difference
    Jacobian at that point was measured to find no further decrease)."""
    z = np.asarray(x0, dtype=float) / scale
    n = len(z)
    r = objective.residuals(z * scale)
    cost, nfev, lam = float(np.dot(r, r)), 1, 1e-3
    reason, converged, J = "iteration limit", False, None
    secant = jacobian is not None and np.shape(jacobian) == (len(r), n)
    if secant:
        J = np.array(jacobian, dtype=float)
    iteration = -1
    for iteration in range(max_fev):
        if not secant:
            J, evaluations = _jacobian(objective, z, r, scale, diff_step)
            nfev += evaluations
        A, g = J.T @ J, J.T @ r
        step = np.linalg.solve(A + lam * np.diag(np.diag(A) + 1e-12), -g)
        tries = (2 if iteration == 0 else 1) if secant else max_retries
        for attempt in range(tries):
            if attempt:  # shorter: half the secant step, or more damping
                step = 0.5 * step if secant else np.linalg.solve(A + lam * np.diag(np.diag(A) + 1e-12), -g)
            r_new = objective.residuals((z + step) * scale)
            nfev += 1
            cost_new = float(np.dot(r_new, r_new))
            if cost_new < cost:
                break
            if not secant:
                lam *= 10.0
        else:
            if secant and iteration == 0:  # the borrowed Jacobian misleads: differentiate instead
                secant = False
                continue
            reason, converged = ("no secant step" if secant else "no damping") + " lowers the cost", True
            break
        if secant:
            J += np.outer(r_new - r - J @ step, step) / float(np.dot(step, step))
        decrease = (cost - cost_new) / max(cost, 1e-300)
        z, r, cost, lam = z + step, r_new, cost_new, max(lam / 10.0, 1e-7)
        if decrease < ftol or np.linalg.norm(step) < xtol:
            reason, converged = "step below tolerance", True
            break
    covariance = None
    if J is not None:
        variance = cost / max(len(r) - n, 1)
        covariance = variance * np.linalg.pinv(J.T @ J) * np.outer(scale, scale)
    return OptimizeOutcome(
        x=z * scale,
        fun=float(objective.scalar(z * scale)),
        nfev=nfev,
        nit=iteration + 1,
        stop_reason=f"lm: {reason}" + (" (Broyden updates)" if secant else ""),
        converged=converged,
        covariance=covariance,
        jacobian=J,
    )


OPTIMIZERS = {
    "lm": _levenberg_marquardt,
    "cmaes": _cmaes,
    "least_squares": _least_squares,
    "powell": _scipy("Powell"),
    "nelder-mead": _scipy("Nelder-Mead"),
}


def minimize(
    name: str,
    objective: "Objective",
    x0: np.ndarray,
    scale: np.ndarray,
    **options,
) -> OptimizeOutcome:
    """Minimise ``objective`` from ``x0`` with the optimiser called ``name`` (see OPTIMIZERS)."""
    try:
        run = OPTIMIZERS[name]
    except KeyError:
        raise RegistrationError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}") from None
    return run(objective, np.asarray(x0, dtype=float), np.asarray(scale, dtype=float), **options)


def _profile(objective: Objective, x: np.ndarray, direction: np.ndarray, step: float
             ) -> tuple[float, float, float, int]:
    """The squared residual norm at x, x + step * direction and x - step * direction (the
    two concurrently), and the number of residuals."""
    r0 = objective.residuals(x)
    plus, minus = (float(np.dot(r, r)) for r in
                   objective.residuals_many([x + step * direction, x - step * direction]))
    return float(np.dot(r0, r0)), plus, minus, len(r0)


def profile_sd(objective: Objective, x: np.ndarray, direction: np.ndarray, step: float) -> float:
    """1-sigma uncertainty of x along the unit ``direction`` (in its units) from the
    curvature of the squared residual norm over +-``step``: ``s^2 / (d^T J^T J d)`` with
    the curvature measured at the scale of ``step`` rather than of a finite-difference
    Jacobian. Infinite where the cost does not rise on both sides together."""
    cost0, plus, minus, m = _profile(objective, x, direction, step)
    curvature = (plus + minus - 2.0 * cost0) / (2.0 * step * step)  # d^T J^T J d for a linear model
    if curvature <= 0.0:
        return float("inf")
    variance = cost0 / max(m - len(x), 1)
    return float(np.sqrt(variance / curvature))


def profile_vertex(objective: Objective, x: np.ndarray, direction: np.ndarray, step: float,
                   max_offset: float) -> float:
    """Where along the unit ``direction`` from x (in its units, within +-``max_offset``) the
    parabola through the squared residual norm at x and x +- ``step`` has its minimum; the
    lower side's ``max_offset`` where the three costs do not curve upward (0 where all
    equal). Over a step of millimetres it sees the slope that an optimiser's local
    derivatives miss on a cost with fine ripples."""
    cost0, plus, minus, _ = _profile(objective, x, direction, step)
    curvature = plus + minus - 2.0 * cost0
    if curvature <= 0.0:
        return 0.0 if minus == plus else (-max_offset if minus < plus else max_offset)
    return float(np.clip(-step * (plus - minus) / (2.0 * curvature), -max_offset, max_offset))
