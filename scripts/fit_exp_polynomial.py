"""A minimax polynomial for the float32 exponential (once the AVX-512 copy's; csrc/fdr/fdr_math.h's
exp_poly keeps Cephes' polynomial, of the same accuracy: 6.9e-8 vs 7.3e-8 relative).

exp(x) = 2^n * p(r) with n = round(x / ln2) and r = x - n ln2 in [-ln2/2, ln2/2]; p is the degree-6
polynomial of least maximum relative error to exp(r) on that interval, found by Lawson's iteratively
reweighted least squares on Chebyshev nodes. Prints its float32 coefficients (lowest power first)
and its maximum relative error, in exact arithmetic and evaluated in float32 by Horner with FMAs.

    python scripts/fit_exp_polynomial.py [--degree 6]
"""

import argparse

import numpy as np


def fit(degree: int, nodes: int = 6000, iterations: int = 60):
    half = np.log(2) / 2
    x = np.cos(np.pi * (np.arange(nodes) + 0.5) / nodes) * half
    f = np.exp(x)
    weights = 1 / f  # relative error
    vander = np.vander(x, degree + 1, increasing=True)
    for _ in range(iterations):
        coef, *_ = np.linalg.lstsq(vander * weights[:, None], f * weights, rcond=None)
        err = np.abs(vander @ coef - f) / f
        weights = weights * (1 + 5 * err / err.max())  # Lawson: weight the peaks of the error up
    return coef, err.max()


def float32_error(coef) -> float:
    """Maximum relative error of Horner's rule in float32 with FMAs (product and sum rounded once)."""
    c = coef.astype(np.float32)
    half = np.log(2) / 2
    r = np.linspace(-half, half, 400001).astype(np.float32)
    p = np.full_like(r, c[-1])
    for k in range(len(c) - 2, -1, -1):
        p = (p.astype(np.float64) * r + np.float64(c[k])).astype(np.float32)
    exact = np.exp(r.astype(np.float64))
    return float(np.max(np.abs(p - exact) / exact))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--degree", type=int, default=6)
    args = parser.parse_args()
    coef, exact_error = fit(args.degree)
    print("coefficients (float32, lowest power first):", [float(np.float32(c)) for c in coef])
    print(f"max relative error: {exact_error:.3g} exact, {float32_error(coef):.3g} in float32")
