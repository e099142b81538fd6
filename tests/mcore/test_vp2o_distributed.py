"""VP2O inside megatron-core across processes (torchrun, gloo): equals the single-process run.

The Stein transform runs on each rank's partial expert gradients before the data-parallel
reduction, with one EP reduce-scatter for the attraction (method §6): these tests check that the
transformed, reduced gradients (and SGD parameters) equal the single-process ones for EP=2 (SGD
and the distributed optimizer) and for EP=1 x DP=2 (distributed optimizer), and that the
identity configuration is exactly megatron's plain step. The routing-variance loss is off
here (like megatron's aux losses it uses per-micro-batch statistics, so micro-batch layouts
change it); the orthogonality loss is on (a per-token mean: layout-independent for
equal-length sequences).
"""

from __future__ import annotations

import pytest
import torch
from dist_helpers import compare, run_worker

pytestmark = pytest.mark.slow

VP2O = ("--vp2o", "--steps", "2", "--alpha", "0.1", "--ortho", "0.01")
SGD = ("--optimizer", "sgd", "--distributed-optimizer", "0")
ADAM_DO = ("--optimizer", "adam", "--distributed-optimizer", "1")


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    return {
        "sgd": run_worker(tmp, 1, "--ep", "1", *VP2O, *SGD),
        "adam": run_worker(tmp, 1, "--ep", "1", *VP2O, *ADAM_DO),
    }


@pytest.fixture(scope="module")
def ep2_sgd(tmp_path_factory):
    return run_worker(tmp_path_factory.mktemp("ep2"), 2, "--ep", "2", *VP2O, *SGD)


def test_sgd_transformed_grads_and_params_match(single, ep2_sgd):
    """EP=2 with SGD: gradients and parameters. (EP=1 x DP=2: the distributed-optimizer test.)"""
    multi = ep2_sgd
    compare(single["sgd"], multi, check_params=True)
    # Prototypes after each step: identical on every rank and equal to the single-process ones.
    for rank in multi:
        for got, want in zip(rank["prototypes"], single["sgd"][0]["prototypes"], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("ep", ["2", "1"], ids=["EP2", "EP1xDP2"])
def test_distributed_optimizer_transformed_grads_match(single, tmp_path, ep):
    """EP=1 x DP=2 also checks the rollback in fp32 after its steps (see the rollback test)."""
    rollback = ("--rollback",) if ep == "1" else ()
    multi = run_worker(tmp_path, 2, "--ep", ep, *VP2O, *ADAM_DO, *rollback)
    compare(single["adam"], multi, check_params=False)
    if rollback:
        _assert_exact_rollback(multi)


def test_coactivation_equals_brute_force_over_ranks(ep2_sgd):
    runs = ep2_sgd
    layers = sorted({n for n, _ in runs[0]["maps"]})
    per_step = 2  # micro-batches per rank per step (dist_train_worker: 2 sequences, mb of 1)
    for step in range(2):
        for li, layer_number in enumerate(layers):
            counts, tokens = torch.zeros(8, 8), 0
            for rank in runs:
                maps = [m for n, m in rank["maps"] if n == layer_number]
                for r in maps[step * per_step : (step + 1) * per_step]:
                    rf = r.float()
                    for t in range(rf.shape[0]):  # explicit loop: sum_t r_t r_t^T
                        counts += torch.outer(rf[t], rf[t])
                    tokens += rf.shape[0]
            for rank in runs:
                torch.testing.assert_close(rank["C"][step][li], counts / tokens)


def test_identity_configuration_equals_plain_megatron_step(tmp_path):
    """alpha=0, M_co = I (top_m=0, min_frac>1), no spec losses: bit-identical to megatron's
    plain step (one process: the EP=2 runs above check the transform across ranks)."""
    plain = run_worker(tmp_path, 1, "--ep", "1", "--steps", "2", *SGD)
    ident = run_worker(
        tmp_path, 1, "--ep", "1", "--vp2o", "--identity", "--steps", "2",
        "--alpha", "0", "--ortho", "0", *SGD,
    )
    for a, b in zip(plain, ident, strict=True):
        assert a["loss"] == b["loss"]
        for step in range(2):
            for name, (_, _, values) in a["grads"][step].items():
                assert torch.equal(values, b["grads"][step][name][2]), name
        for name, value in a["params"].items():
            assert torch.equal(value, b["params"][name]), name


def test_prototype_state_loads_under_another_ep_size(ep2_sgd, single, init_parallel):
    """The state an EP=2 run saved (full [L, E, d] on every rank) loads into a transform built
    at EP=1 on the worker's model, whose own initial prototypes differ from it, and equals the
    EP=1 run's prototypes after the same steps."""
    from vp2o.config import load_config
    from vp2o.mcore import model as mdl
    from vp2o.mcore import vp2o_moe
    from vp2o.mcore.stein_step import SteinTransform

    state = ep2_sgd[0]["state"]
    assert torch.equal(state["prototypes"], ep2_sgd[1]["state"]["prototypes"])
    cfg = load_config(None, ["algorithm=vp2o", "parallel.expert_parallel=1"])
    groups = init_parallel(cfg)
    model = mdl.build_model(cfg, layer_spec_hook=vp2o_moe.vp2o_layer_spec_hook(cfg))
    transform = SteinTransform(model, cfg.vp2o, groups, num_experts=cfg.model.num_experts,
                               seed=cfg.seed)
    assert transform.prototypes.shape == state["prototypes"].shape
    assert not torch.allclose(transform.prototypes, state["prototypes"])  # a real load follows
    transform.load_state_dict(state)
    torch.testing.assert_close(transform.prototypes, single["sgd"][0]["prototypes"][-1],
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(transform.anchor, state["anchor"].float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="layers, experts, hidden"):
        transform.load_state_dict({k: v[:, :4] for k, v in state.items()})


def test_rollback_restores_every_rank_exactly_from_the_optimizer_shards(tmp_path):
    """The trust region's rollback (optim_state.Rollback: save, restore) at EP=1 x DP=2 with the
    distributed optimizer, bf16 parameters with fp32 main params (fp32: the distributed-optimizer
    test above): each rank copies only its optimizer shard (main params and Adam state), and the
    restore rebuilds the parameters by megatron's own copy and all-gather, so every parameter,
    main param and state tensor on every rank is back to its value bit for bit."""
    runs = run_worker(tmp_path, 2, "--ep", "1", *VP2O, *ADAM_DO, "--dtype", "bf16", "--rollback")
    _assert_exact_rollback(runs)


def _assert_exact_rollback(runs: list[dict]) -> None:
    for rank in runs:
        check = rank["rollback"]
        assert check["moved"] > 0  # the step changed something, so the restore had work to do
        assert check["after_restore"] == 0.0
        assert check["copied_params"] == 0
