"""Every optimiser in the table minimises a known quadratic; unknown names are refused."""

import numpy as np
import pytest

from guidance.registration.optimizers import OPTIMIZERS, minimize


class Quadratic:
    """Residuals A (x - x_star): minimum 0 at x_star, anisotropic like pose parameters."""

    def __init__(self):
        self.x_star = np.array([2.0, -1.0, 0.5, 5.0, -3.0, 12.0])
        self.A = np.diag([1.0, 2.0, 0.5, 0.3, 0.3, 0.05])

    def residuals(self, x):
        return self.A @ (np.asarray(x) - self.x_star)

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
