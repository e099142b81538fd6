"""How often VP2O's behaviour budget (method §11) asks for a refresh at 8K and 16K-token responses.

A simulation of the learner/actor log-ratios `log ρ_t = log π_θ − log μ` of one rollout batch,
fed to the function the learner uses (`vp2o.algo.trust_region.behavior_stats`), for several
settings of `vp2o.behavior` (`ess_level`, `lam`, `ess_min`; `eps_drift` 0.1 throughout):

- mismatch: the same weights in the engine and the learner (bf16 kernels, different reductions):
  per-token log-ratios with standard deviation σ (0.01-0.03), heavy-tailed (Student t, 4 degrees
  of freedom, scaled to std σ) with mean −σ²/2 (so that E_μ[ρ] ≈ 1);
- moved: the mismatch at σ = 0.02 plus a policy change of the learner after its updates, an
  independent per-token term of std σ_p (0.05-0.2; same shape).

Responses have lengths drawn uniformly from [L/4, L] for L = 8192 and 16384; a batch has 256.
Printed per (scenario, length): the fraction of batches whose drift exceeds eps_drift (the same
for every setting), and per setting the fraction that ask for a refresh (drift > eps_drift or
ESS < ess_min) over `--trials` batches, with the median ESS in brackets.

    .venv/bin/python benchmarks/ess_refresh_sim.py            # ~2 minutes on 2 CPU cores
    .venv/bin/python benchmarks/ess_refresh_sim.py --trials 5 --batch 64   # a quick look
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from vp2o.algo.trust_region import behavior_stats

EPS_DRIFT = 0.1
SETTINGS = [  # (name, ess_level, lam, ess_min)
    ("sequence λ=0.5", "sequence", 0.5, 0.5),
    ("sequence λ=0.05", "sequence", 0.05, 0.5),
    ("token λ=0.5", "token", 0.5, 0.5),
    ("token λ=1.0", "token", 1.0, 0.5),
]
SCENARIOS = [  # (name, mismatch σ, policy-change σ_p)
    ("mismatch σ=0.01", 0.01, 0.0),
    ("mismatch σ=0.02", 0.02, 0.0),
    ("mismatch σ=0.03", 0.03, 0.0),
    ("moved σ_p=0.05", 0.02, 0.05),
    ("moved σ_p=0.1", 0.02, 0.1),
    ("moved σ_p=0.2", 0.02, 0.2),
]


def heavy_tailed(rng: np.random.Generator, shape: tuple[int, int], std: float) -> np.ndarray:
    """Student-t (4 dof) noise with standard deviation ``std`` and mean −std²/2."""
    if std == 0:
        return np.zeros(shape)
    return rng.standard_t(4, size=shape) * (std / np.sqrt(2.0)) - std * std / 2


def batch(rng: np.random.Generator, n: int, length: int, sigma: float, sigma_p: float):
    """(log ρ [n, length] float32, response mask [n, length])."""
    lengths = rng.integers(length // 4, length + 1, size=n)
    mask = np.arange(length)[None, :] < lengths[:, None]
    log_ratio = heavy_tailed(rng, (n, length), sigma) + heavy_tailed(rng, (n, length), sigma_p)
    return torch.from_numpy(log_ratio.astype(np.float32)), torch.from_numpy(mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    print(f"{args.batch} responses per batch, lengths uniform in [L/4, L], {args.trials} batches "
          f"per cell, eps_drift={EPS_DRIFT}")
    print(f"| scenario | L | drift > {EPS_DRIFT} | "
          f"{' | '.join(name for name, *_ in SETTINGS)} |")
    print("|---|---:|---:|" + "---:|" * len(SETTINGS))
    for scenario, sigma, sigma_p in SCENARIOS:
        for length in args.lengths:
            counts = {name: 0 for name, *_ in SETTINGS}  # refreshes
            far_count = 0
            ess_values: dict[str, list[float]] = {name: [] for name, *_ in SETTINGS}
            for _ in range(args.trials):
                log_ratio, mask = batch(rng, args.batch, length, sigma, sigma_p)
                zeros = torch.zeros_like(log_ratio)
                for name, level, lam, ess_min in SETTINGS:
                    drift, ess = behavior_stats(log_ratio, zeros, mask, lam, ess_level=level)
                    far = float(drift) > EPS_DRIFT
                    counts[name] += far or float(ess) < ess_min
                    ess_values[name].append(float(ess))
                far_count += far
            cells = [f"{counts[name] / args.trials:.2f} ({statistics.median(ess_values[name]):.3g})"
                     for name, *_ in SETTINGS]
            print(f"| {scenario} | {length} | {far_count / args.trials:.2f} | "
                  f"{' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
