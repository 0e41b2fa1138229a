"""Closed-form probabilities of half-space classifiers under Gaussian noise, computed without arqc's code.

A linear classifier f(x) = 1[w·x + b > 0] (``linear_models.LinearClassifier``) sees x + ε, ε ~ N(0, σ²I), as
the Gaussian scalar z = w·(x+ε) + b ~ N(w·x + b, σ²‖w‖²). Two such classifiers f, f′ see the pair
(z, z′), bivariate normal with correlation ρ = w·w′ / (‖w‖‖w′‖); so P(f(x+ε) = 1) = Φ(a), a = (w·x + b)/(σ‖w‖),
and P(f = f′ = 1) is the orthant probability Φ₂(a, a′; ρ) of two standard normals with correlation ρ.
"""

from __future__ import annotations

import numpy as np
from scipy.special import owens_t
from scipy.stats import norm


def weights_of(model) -> tuple[np.ndarray, float]:
    """(w, b) of a LinearClassifier as the model holds them (float32, widened to float64)."""
    return model.w.detach().double().numpy().copy(), float(model.b.detach().double())


def standardized_margin(x: np.ndarray, w: np.ndarray, b: float, sigma: float) -> float:
    """a = (w·x + b) / (σ‖w‖): P(f(x+ε) = 1) = Φ(a)."""
    return float((np.asarray(x, np.float64).ravel() @ w + b) / (sigma * np.linalg.norm(w)))


def bivariate_normal_cdf(h: float, k: float, rho: float) -> float:
    """Φ₂(h, k; ρ) = P(U ≤ h, V ≤ k) for standard normals with correlation |ρ| < 1 (Owen 1956, via T(h, a)).

    Φ₂ = ½Φ(h) + ½Φ(k) − T(h, (k − ρh)/(h√(1−ρ²))) − T(k, (h − ρk)/(k√(1−ρ²))) − β, with β = ½ when hk < 0
    or (hk = 0 and h + k < 0), else 0.
    """
    if not abs(rho) < 1:
        raise ValueError(f"|rho| must be < 1, got {rho}")
    s = np.sqrt(1 - rho * rho)
    if h == 0 and k == 0:
        return 0.25 + np.arcsin(rho) / (2 * np.pi)

    def t(p: float, q: float) -> float:
        if p == 0:  # T(0, a) = arctan(a)/(2π), a = ±∞ here
            return 0.25 * np.sign(q - rho * p)
        return float(owens_t(p, (q - rho * p) / (p * s)))

    beta = 0.5 if h * k < 0 or (h * k == 0 and h + k < 0) else 0.0
    return float(0.5 * norm.cdf(h) + 0.5 * norm.cdf(k) - t(h, k) - t(k, h) - beta)


def disagreement_probability(x: np.ndarray, f_wb: tuple[np.ndarray, float], g_wb: tuple[np.ndarray, float],
                             sigma: float) -> float:
    """P(f(x+ε) ≠ f′(x+ε)) = Φ(a) + Φ(a′) − 2Φ₂(a, a′; ρ) for half-spaces f, f′ given as (w, b)."""
    (w, b), (w_q, b_q) = f_wb, g_wb
    a, a_q = standardized_margin(x, w, b, sigma), standardized_margin(x, w_q, b_q, sigma)
    rho = float(w @ w_q / (np.linalg.norm(w) * np.linalg.norm(w_q)))
    both_one = bivariate_normal_cdf(a, a_q, rho)
    return max(0.0, float(norm.cdf(a) + norm.cdf(a_q) - 2 * both_one))
