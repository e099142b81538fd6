"""Trust regions (method §10-§11): anchor distance and behaviour statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vp2o.algo import trust_region as tr

F64 = torch.float64


def _routing(t: int, e: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(t, e, generator=gen), -1)
    gates, ids = probs.topk(k, dim=-1)
    return ids, gates


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _anchor_loop(ids, gates, u, ids_a, gates_a, u_a) -> list[float]:
    """‖Σ ĝ u_j (sign-aligned) − Σ ĝ_anc u^anc_j‖ per token, straight from method §10."""
    out = []
    for t in range(ids.shape[0]):
        b = torch.zeros(u.shape[1], dtype=F64)
        b_anc = torch.zeros(u.shape[1], dtype=F64)
        g_sum, ga_sum = float(gates[t].sum()), float(gates_a[t].sum())
        for slot in range(ids.shape[1]):
            j = int(ids[t, slot])
            uj = u[j].double()
            if float(uj @ u_a[j].double()) < 0:
                uj = -uj
            b += float(gates[t, slot]) / g_sum * uj
            ja = int(ids_a[t, slot])
            b_anc += float(gates_a[t, slot]) / ga_sum * u_a[ja].double()
        out.append(float((b - b_anc).norm()))
    return out


def test_anchor_distance_matches_loop() -> None:
    ids, gates = _routing(20, 8, 2, seed=0)
    ids_a, gates_a = _routing(20, 8, 2, seed=1)
    gen = torch.Generator().manual_seed(2)
    u_a = _unit(torch.randn(8, 6, generator=gen))
    u = _unit(u_a + 0.3 * torch.randn(8, 6, generator=gen)) * torch.tensor(
        [1, -1, 1, 1, -1, 1, -1, 1.0]
    ).unsqueeze(-1)
    per_token = tr.anchor_distance_per_token(ids, gates, u, ids_a, gates_a, u_a)
    ref = _anchor_loop(ids, gates, u, ids_a, gates_a, u_a)
    np.testing.assert_allclose(per_token.numpy(), ref, rtol=1e-5, atol=1e-6)
    assert float(tr.anchor_distance(ids, gates, u, ids_a, gates_a, u_a)) == pytest.approx(
        np.mean(ref), rel=1e-5
    )
    mask = torch.arange(20) % 3 == 0
    got = tr.anchor_distance(ids, gates, u, ids_a, gates_a, u_a, mask=mask)
    assert float(got) == pytest.approx(np.mean(np.array(ref)[mask.numpy()]), rel=1e-5)
    # barycenters (the materialising reference) agree too
    aligned = tr.align_signs(u, u_a)
    diff = tr.barycenters(ids, gates, aligned) - tr.barycenters(ids_a, gates_a, u_a)
    np.testing.assert_allclose(diff.norm(dim=-1).numpy(), ref, rtol=1e-5, atol=1e-6)


def test_anchor_distance_zero_at_anchor_and_sign_invariant() -> None:
    ids, gates = _routing(30, 8, 3, seed=3)
    u = _unit(torch.randn(8, 16, generator=torch.Generator().manual_seed(4)))
    assert float(tr.anchor_distance(ids, gates, u, ids, gates, u)) < 1e-6
    flips = torch.tensor([-1, 1, -1, -1, 1, 1, -1, 1.0]).unsqueeze(-1)
    assert float(tr.anchor_distance(ids, gates, u * flips, ids, gates, u)) < 1e-6
    # gates are renormalised: scaling them changes nothing
    assert float(tr.anchor_distance(ids, 3 * gates, u, ids, gates, u)) < 1e-6
    other = _unit(torch.randn(8, 16, generator=torch.Generator().manual_seed(5)))
    d1 = tr.anchor_distance(ids, gates, other, ids, gates, u)
    d2 = tr.anchor_distance(ids, gates, other * flips, ids, gates, u)
    assert float(d1) > 0.1
    torch.testing.assert_close(d1, d2)


def test_anchor_distance_layer_dimension() -> None:
    per_layer = [_routing(10, 6, 2, seed=s) for s in range(4)]
    ids = torch.stack([per_layer[0][0], per_layer[1][0]])
    gates = torch.stack([per_layer[0][1], per_layer[1][1]])
    ids_a = torch.stack([per_layer[2][0], per_layer[3][0]])
    gates_a = torch.stack([per_layer[2][1], per_layer[3][1]])
    gen = torch.Generator().manual_seed(6)
    u = _unit(torch.randn(2, 6, 5, generator=gen))
    u_a = _unit(torch.randn(2, 6, 5, generator=gen))
    both = tr.anchor_distance_per_token(ids, gates, u, ids_a, gates_a, u_a)
    for layer in range(2):
        one = tr.anchor_distance_per_token(
            ids[layer], gates[layer], u[layer], ids_a[layer], gates_a[layer], u_a[layer]
        )
        torch.testing.assert_close(both[layer], one)
    mean = tr.anchor_distance(ids, gates, u, ids_a, gates_a, u_a)
    torch.testing.assert_close(mean, both.mean())
    # prototypes broadcast over a batch dimension: [layers, 1, E, d] against [layers, B, T, k]
    ids_b, gates_b = torch.stack([ids, ids.flip(1)], 1), torch.stack([gates, gates.flip(1)], 1)
    ids_ab, gates_ab = torch.stack([ids_a, ids_a], 1), torch.stack([gates_a, gates_a], 1)
    got = tr.anchor_distance_per_token(
        ids_b, gates_b, u.unsqueeze(1), ids_ab, gates_ab, u_a.unsqueeze(1)
    )  # [layers, 2, T]
    torch.testing.assert_close(got[:, 0], both)
    for layer in range(2):
        flipped = tr.anchor_distance_per_token(
            ids[layer].flip(0),
            gates[layer].flip(0),
            u[layer],
            ids_a[layer],
            gates_a[layer],
            u_a[layer],
        )
        torch.testing.assert_close(got[layer, 1], flipped)


def _ess_reference(log_ratio: np.ndarray, mask: np.ndarray, lam: float, level: str) -> float:
    if level == "sequence":
        s = [lam * log_ratio[i][mask[i]].sum() for i in range(len(mask)) if mask[i].any()]
    else:
        s = list(lam * log_ratio[mask])
    s = np.array(s, dtype=np.float64)
    w = np.exp(s - s.max())  # the ratio is unchanged by a common factor
    return float(w.sum() ** 2 / (len(w) * (w**2).sum()))


def test_behavior_stats_identical_policies() -> None:
    logp = -torch.rand(4, 7, generator=torch.Generator().manual_seed(7))
    mask = torch.ones(4, 7, dtype=torch.bool)
    for level in ("sequence", "token"):
        drift, ess = tr.behavior_stats(logp, logp.clone(), mask, lam=0.5, ess_level=level)
        assert float(drift) == 0.0 and float(ess) == 1.0


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_behavior_stats_against_float64_reference(level: str) -> None:
    gen = torch.Generator().manual_seed(8)
    logp = -torch.rand(6, 9, generator=gen) * 3
    logp_old = logp + 0.3 * torch.randn(6, 9, generator=gen)
    mask = torch.rand(6, 9, generator=gen) > 0.3
    mask[5] = False  # a sequence with no response tokens is no sample
    lr = (logp.double() - logp_old.double()).numpy()
    m = mask.numpy()
    drift, ess = tr.behavior_stats(logp, logp_old, mask, lam=0.7, ess_level=level)
    assert float(drift) == pytest.approx(np.abs(lr[m]).mean(), rel=1e-6)
    assert float(ess) == pytest.approx(_ess_reference(lr, m, 0.7, level), rel=1e-6)
    assert 0 < float(ess) <= 1


def test_behavior_stats_extreme_log_ratios_and_masked_garbage() -> None:
    logp = torch.zeros(3, 4)
    logp_old = torch.zeros(3, 4)
    logp_old[0, :2] = 1000.0
    logp_old[1, :2] = -1000.0
    mask = torch.ones(3, 4, dtype=torch.bool)
    for level in ("sequence", "token"):
        drift, ess = tr.behavior_stats(logp, logp_old, mask, lam=0.5, ess_level=level)
        assert torch.isfinite(drift) and torch.isfinite(ess)
        assert float(drift) == pytest.approx(4000 / 12)
        assert 0 < float(ess) <= 1
    # sequence level: one sequence dominates -> ESS = 1/N
    _, ess = tr.behavior_stats(logp, logp_old, mask, lam=0.5, ess_level="sequence")
    assert float(ess) == pytest.approx(1 / 3)
    # masked tokens are ignored, whatever they hold
    garbage = logp_old.clone()
    garbage[:, 3] = float("inf")
    mask2 = mask.clone()
    mask2[:, 3] = False
    ref = tr.behavior_stats(logp[:, :3], logp_old[:, :3], mask[:, :3], lam=0.5)
    got = tr.behavior_stats(logp, garbage, mask2, lam=0.5)
    torch.testing.assert_close(got, ref)


def test_behavior_stats_empty_mask_and_unknown_level() -> None:
    drift, ess = tr.behavior_stats(torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2, 3), lam=0.5)
    assert float(drift) == 0.0 and float(ess) == 1.0
    with pytest.raises(ValueError, match="sequence, token"):
        tr.behavior_stats(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), ess_level="x")
    assert math.isfinite(float(ess))


def test_anchor_distance_of_shares_combines_to_the_whole_batch() -> None:
    """Data-parallel ranks each hold some sequences: their partials give the whole batch's D
    (the masked mean of the per-token loop over all of it), an empty share included."""
    per_layer = [_routing(12, 6, 2, seed=s) for s in range(4)]
    ids = torch.stack([per_layer[0][0], per_layer[1][0]]).view(2, 3, 4, 2)  # [layers, B, T, k]
    gates = torch.stack([per_layer[0][1], per_layer[1][1]]).view(2, 3, 4, 2)
    ids_a = torch.stack([per_layer[2][0], per_layer[3][0]]).view(2, 3, 4, 2)
    gates_a = torch.stack([per_layer[2][1], per_layer[3][1]]).view(2, 3, 4, 2)
    gen = torch.Generator().manual_seed(9)
    u = _unit(torch.randn(2, 1, 6, 5, generator=gen))
    u_a = _unit(torch.randn(2, 1, 6, 5, generator=gen))
    mask = torch.rand(1, 3, 4, generator=gen) > 0.4  # [1, B, T]: the same tokens in each layer
    want = []
    for layer in range(2):
        d = _anchor_loop(ids[layer].reshape(12, 2), gates[layer].reshape(12, 2), u[layer, 0],
                         ids_a[layer].reshape(12, 2), gates_a[layer].reshape(12, 2), u_a[layer, 0])
        want += [x for x, keep in zip(d, mask.reshape(12).tolist(), strict=True) if keep]
    shares = [slice(0, 2), slice(2, 3), slice(3, 3)]  # sequences per rank; the last holds none
    parts = torch.stack([
        tr.anchor_distance_partials(
            tr.anchor_distance_per_token(ids[:, sl], gates[:, sl], u, ids_a[:, sl],
                                         gates_a[:, sl], u_a),
            mask[:, sl])
        for sl in shares
    ])
    assert parts[2].tolist() == [0.0, 0.0]
    got = tr.anchor_distance_from_partials(parts)
    assert float(got) == pytest.approx(sum(want) / len(want), rel=1e-6)
    whole = tr.anchor_distance(ids, gates, u, ids_a, gates_a, u_a, mask=mask)
    assert float(whole) == pytest.approx(float(got), rel=1e-6)


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_behavior_stats_of_shares_combine_to_the_whole_batch(level: str) -> None:
    gen = torch.Generator().manual_seed(10)
    logp = -torch.rand(7, 9, generator=gen) * 3
    logp_old = logp + 0.5 * torch.randn(7, 9, generator=gen)
    logp_old[0, :3] -= 400.0  # a dominant sample in one share: the LSE combination must hold it
    mask = torch.rand(7, 9, generator=gen) > 0.3
    mask[4] = False
    lr = (logp.double() - logp_old.double()).numpy()
    m = mask.numpy()
    shares = [slice(0, 3), slice(3, 5), slice(5, 5), slice(5, 7)]  # one empty share
    parts = torch.stack([tr.behavior_partials(logp[sl], logp_old[sl], mask[sl], 0.7,
                                              ess_level=level) for sl in shares])
    drift, ess = tr.behavior_from_partials(parts)
    assert float(drift) == pytest.approx(np.abs(lr[m]).mean(), rel=1e-9)
    assert float(ess) == pytest.approx(_ess_reference(lr, m, 0.7, level), rel=1e-9)
    whole = tr.behavior_stats(logp, logp_old, mask, 0.7, ess_level=level)
    assert [float(x) for x in whole] == pytest.approx([float(drift), float(ess)], rel=1e-6)
    # no samples in any share: drift 0, ESS 1 (as for an empty batch)
    empty = tr.behavior_partials(logp, logp_old, torch.zeros_like(mask), 0.7, ess_level=level)
    assert [float(x) for x in tr.behavior_from_partials(empty.expand(2, 5))] == [0.0, 1.0]
