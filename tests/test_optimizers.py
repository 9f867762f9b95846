"""Every optimiser in the table minimises a known quadratic; unknown names are refused."""

import numpy as np
import pytest

from guidance.registration.optimizers import OPTIMIZERS, minimize, profile_sd, profile_vertex


class Quadratic:
    """Residuals A (x - x_star): minimum 0 at x_star, anisotropic like pose parameters."""

    def __init__(self):
        self.x_star = np.array([2.0, -1.0, 0.5, 5.0, -3.0, 12.0])
        self.A = np.diag([1.0, 2.0, 0.5, 0.3, 0.3, 0.05])

    def residuals(self, x):
        return self.A @ (np.asarray(x) - self.x_star)

    def residuals_many(self, xs):
        return [self.residuals(x) for x in xs]

    def scalar(self, x):
        r = self.residuals(x)
        return float(r @ r)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizers_find_the_minimum(name):
    objective = Quadratic()
    scale = np.array([4.0, 4.0, 4.0, 6.0, 6.0, 20.0])
    options = {"max_fev": 2000} if name in ("powell", "nelder-mead") else {}
    if name == "cmaes":
        options = {"popsize": 12, "max_iter": 300, "bound": 5.0, "seed": 3}
    outcome = minimize(name, objective, np.zeros(6), scale, **options)
    np.testing.assert_allclose(outcome.x, objective.x_star, atol=0.25)
    assert outcome.fun < 1e-2
    assert outcome.nfev > 0 and outcome.stop_reason


def test_unknown_optimizer_lists_the_names():
    with pytest.raises(ValueError, match="cmaes, least_squares, powell, nelder-mead"):
        minimize("bfgs", Quadratic(), np.zeros(6), np.ones(6))


def test_lm_started_from_a_borrowed_jacobian_needs_fewer_evaluations():
    """The exact Jacobian of a nearby problem (the quadratic's, in units of scale): Broyden
    steps reach the same minimum with a fraction of the finite-difference evaluations, and
    the outcome's Jacobian is the one to borrow next."""
    objective = Quadratic()
    scale = np.array([4.0, 4.0, 4.0, 6.0, 6.0, 20.0])
    x0 = objective.x_star + np.array([0.5, -0.3, 0.2, 0.4, -0.6, 1.0])
    plain = minimize("lm", objective, x0, scale)
    borrowed = minimize("lm", objective, x0, scale, jacobian=objective.A * scale)
    np.testing.assert_allclose(borrowed.x, objective.x_star, atol=1e-3)
    np.testing.assert_allclose(plain.x, objective.x_star, atol=1e-3)
    assert "Broyden" in borrowed.stop_reason
    assert borrowed.nfev <= plain.nfev / 3, (borrowed.nfev, plain.nfev)
    np.testing.assert_allclose(borrowed.jacobian, objective.A * scale, atol=1e-6)  # linear: Broyden keeps it exact
    np.testing.assert_allclose(plain.jacobian, objective.A * scale, rtol=1e-6, atol=1e-9)


class QuadraticKnowingTranslations(Quadratic):
    """The quadratic, telling its last three Jacobian columns (like the registration's
    translations, taken from the rendered images)."""

    def derivatives(self, x):
        return {k: self.A[:, k] for k in (3, 4, 5)}


def test_lm_uses_the_objectives_known_derivatives_and_differences_the_rest():
    """Known columns cost no evaluation: each finite-difference Jacobian takes 3 instead of
    6, and the minimum and the final Jacobian are the same."""
    scale = np.array([4.0, 4.0, 4.0, 6.0, 6.0, 20.0])
    x0 = Quadratic().x_star + np.array([0.5, -0.3, 0.2, 0.4, -0.6, 1.0])
    plain = minimize("lm", Quadratic(), x0, scale)
    knowing = minimize("lm", QuadraticKnowingTranslations(), x0, scale)
    np.testing.assert_allclose(knowing.x, Quadratic().x_star, atol=1e-3)
    assert knowing.nit == plain.nit
    assert knowing.nfev == plain.nfev - 3 * plain.nit
    np.testing.assert_allclose(knowing.jacobian, Quadratic().A * scale, rtol=1e-6, atol=1e-9)


def test_lm_falls_back_to_finite_differences_when_the_borrowed_jacobian_misleads():
    """A Jacobian of the wrong sign points every step uphill: the first step (and half of
    it) fail, finite differences take over and still find the minimum; a Jacobian of
    another shape (other image size) is ignored."""
    objective = Quadratic()
    scale = np.ones(6)
    x0 = objective.x_star + 0.5
    wrong = minimize("lm", objective, x0, scale, jacobian=-objective.A)
    np.testing.assert_allclose(wrong.x, objective.x_star, atol=1e-3)
    assert "Broyden" not in wrong.stop_reason
    assert wrong.nfev > 2 + 6  # the two failed secant steps, then at least one finite-difference Jacobian
    other_shape = minimize("lm", objective, x0, scale, jacobian=np.ones((3, 6)))
    plain = minimize("lm", objective, x0, scale)
    assert other_shape.nfev == plain.nfev
    np.testing.assert_allclose(other_shape.x, plain.x)


class NoisyLinear:
    """Residuals A (x - x_star) + e: a linear model with noise e, whose last parameter the
    data do not constrain (its column of A is zero)."""

    def __init__(self):
        rng = np.random.default_rng(4)
        self.A = rng.normal(size=(400, 6))
        self.A[:, 5] = 0.0
        self.e = rng.normal(scale=0.3, size=400)
        self.x_star = rng.normal(size=6)

    def residuals(self, x):
        return self.A @ (np.asarray(x) - self.x_star) + self.e

    def residuals_many(self, xs):
        return [self.residuals(x) for x in xs]


def test_profile_sd_is_the_gauss_newton_sd_of_a_linear_model_and_infinite_where_unconstrained():
    objective = NoisyLinear()
    x = objective.x_star + 0.1
    direction = np.array([0.0, 0.6, 0.0, 0.8, 0.0, 0.0])
    r = objective.residuals(x)
    expected = np.sqrt(float(r @ r) / (400 - 6) / float(direction @ objective.A.T @ objective.A @ direction))
    for step in (0.2, 3.0):  # a linear model's curvature does not depend on the step
        assert profile_sd(objective, x, direction, step) == pytest.approx(expected, rel=1e-9)
    assert profile_sd(objective, x, np.eye(6)[5], 3.0) == np.inf


class Concave:
    """Residual sqrt(100 - (x0 - 1)^2): a cost that curves downward, lowest far from x0 = 1."""

    def residuals(self, x):
        return np.array([np.sqrt(100.0 - (x[0] - 1.0) ** 2)])

    def residuals_many(self, xs):
        return [self.residuals(x) for x in xs]


def test_profile_vertex_is_a_linear_models_line_minimum_clipped_and_downhill_where_the_cost_is_concave():
    objective = NoisyLinear()
    x = objective.x_star + 0.1
    direction = np.array([0.0, 0.6, 0.0, 0.8, 0.0, 0.0])
    J, r = objective.A, objective.residuals(x)
    expected = -float(direction @ J.T @ r) / float(direction @ J.T @ J @ direction)  # exact line search
    assert abs(expected) > 0.05
    for step in (0.2, 3.0):  # the parabola of a quadratic cost does not depend on the step
        assert profile_vertex(objective, x, direction, step, 10.0) == pytest.approx(expected, rel=1e-9)
    assert profile_vertex(objective, x, direction, 1.0, abs(expected) / 2) == pytest.approx(expected / 2, rel=1e-12)
    assert profile_vertex(objective, x, np.eye(6)[5], 3.0, 10.0) == 0.0  # unconstrained: stays
    assert profile_vertex(Concave(), np.zeros(1), np.ones(1), 1.0, 8.0) == -8.0
