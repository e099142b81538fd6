"""The trust region's rollback (method §10): `optim_state.Rollback`'s `save` / `restore` undo a step
exactly, for every optimizer layout the trainer builds (distributed optimizer on and off, fp32
and bf16 parameters), including the first step (whose Adam state the restore must drop). The
data-parallel case (the restore's all-gather of the distributed optimizer's shards) is in
tests/mcore/test_vp2o_distributed.py."""

from __future__ import annotations

import pytest
import torch

from vp2o.config import load_config
from vp2o.mcore import model as mdl
from vp2o.mcore import training, vp2o_moe
from vp2o.mcore.optim_state import Rollback, megatron_parts

S, B = 8, 2


def _state(model, optimizer) -> dict:
    """Every number a step changes: parameters, main params, optimizer state (copies)."""
    out = {f"param/{n}": p.detach().clone() for n, p in model.named_parameters()}
    for i, opt in enumerate(part.optimizer for part in megatron_parts(optimizer)):
        for j, p in enumerate(q for g in opt.param_groups for q in g["params"]):
            out[f"main/{i}/{j}"] = p.detach().clone()
            for key, value in opt.state.get(p, {}).items():
                out[f"state/{i}/{j}/{key}"] = (
                    value.detach().clone() if torch.is_tensor(value) else value
                )
    return out


def _assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if torch.is_tensor(value):
            assert torch.equal(got[key], value), key
        else:
            assert got[key] == value, key


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("distributed", [True, False], ids=["dist-opt", "local-opt"])
def test_restore_undoes_a_step_exactly_and_the_step_repeats_bitwise(
    init_parallel, dtype, distributed
):
    cfg = load_config(None, [
        "algorithm=vp2o", "model.hidden_size=64", "model.moe_ffn_hidden_size=32",
        "model.num_layers=2", f"model.params_dtype={dtype}", "optimizer.lr=1e-2",
        f"parallel.use_distributed_optimizer={str(distributed).lower()}",
    ])
    init_parallel(cfg)
    torch.manual_seed(0)
    model = mdl.build_model(cfg, layer_spec_hook=vp2o_moe.vp2o_layer_spec_hook(cfg))
    ddp = training.wrap_ddp(model, cfg)
    optimizer = training.build_optimizer(ddp, cfg)
    rollback = Rollback(model, optimizer)
    with pytest.raises(RuntimeError, match="before any save"):
        rollback.restore()
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, cfg.model.vocab_size, (B, S), generator=gen) for _ in range(2)]
    pos = torch.arange(S).unsqueeze(0).expand(B, -1)

    def step(tokens):
        training.zero_grads(ddp, optimizer)

        def loss_fn(m, mb):
            return m(mb["tokens"], pos, None, labels=mb["tokens"]).float().mean(), {}

        training.forward_backward(ddp, [{"tokens": tokens}], loss_fn)
        optimizer.step()

    for first_step in (True, False):  # the first step creates Adam's state; a later one updates
        if not first_step:
            step(batches[0])
        before = _state(model, optimizer)
        rollback.save()
        # No parameter is copied: fp32, the optimizer steps the parameters' own memory
        # (FP32Optimizer: the parameters; distributed optimizer at DP = 1: views of the whole
        # buffer); bf16, the restore rounds the main params into them as megatron's step does.
        assert not rollback.copied_params
        step(batches[1])
        after = _state(model, optimizer)
        assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("param/"))
        rollback.restore()
        _assert_same(_state(model, optimizer), before)
        step(batches[1])  # the rejected step again: bitwise the same result
        _assert_same(_state(model, optimizer), after)
        rollback.restore()
