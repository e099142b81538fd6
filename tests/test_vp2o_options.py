"""VP2O's method options in the config (vp2o.kernel, vp2o.attraction,
vp2o.transport_specialisation, vp2o.trust_region.enabled) and the clip arguments the learner
hands to the policy loss."""

from __future__ import annotations

import pytest
import torch

from vp2o.algo import grpo
from vp2o.config import ConfigError, load_config


def test_defaults_are_the_methods():
    v = load_config(None, ["algorithm=vp2o"]).vp2o
    assert v.kernel == "axial"  # §5
    assert v.attraction is True  # §6
    assert v.transport_specialisation is True  # §6: g_j is the gradient of the full loss
    assert v.trust_region.enabled is True  # §10


def test_options_load_and_bad_values_name_the_key():
    cfg = load_config(None, ["algorithm=vp2o", "vp2o.kernel=signed", "vp2o.attraction=false",
                             "vp2o.transport_specialisation=false",
                             "vp2o.trust_region.enabled=false"])
    v = cfg.vp2o
    assert (v.kernel, v.attraction, v.transport_specialisation, v.trust_region.enabled) == (
        "signed", False, False, False)
    with pytest.raises(ConfigError, match="vp2o.kernel"):
        load_config(None, ["vp2o.kernel=gauss"])
    with pytest.raises(ConfigError, match="vp2o.trust_region.enabled"):
        load_config(None, ["vp2o.trust_region.enabled=maybe"])


def test_separate_specialisation_gradients_refuse_activation_recompute():
    base = ["algorithm=vp2o", "vp2o.transport_specialisation=false", "model.recompute=full"]
    with pytest.raises(ConfigError, match="model.recompute.*transport_specialisation=false"):
        load_config(None, base)
    # without specialisation losses there is nothing to keep apart
    load_config(None, [*base, "vp2o.ortho_coeff=0", "vp2o.variance_coeff=0"])


def test_dual_clip_reaches_only_a_clipping_loss():
    from vp2o.policy_loss import clip_options

    grpo_cfg = load_config(None, ["algorithm=grpo", "loss.clip_ratio_c=3.0"])
    assert clip_options(grpo_cfg) == {"clip_low": 0.2, "clip_high": 0.2, "clip_ratio_c": 3.0}
    # A VP2O config whose loss does not clip, with clip_ratio_c set behind the loader's back
    # (the loader refuses it): the loss still gets no clip argument at all.
    cfg = load_config(None, ["algorithm=vp2o", "loss.clip=false"])
    cfg.loss.clip_ratio_c = 3.0
    opts = clip_options(cfg)
    assert opts == {"clip_low": None, "clip_high": None, "clip_ratio_c": None}
    # ... so the loss is the unclipped -rho A, also where the dual clip would have bitten
    # (A < 0 and rho > c)
    logp_old = torch.zeros(2, 3)
    logp = torch.log(torch.tensor([[5.0, 1.0, 0.5], [2.0, 4.0, 1.0]]))
    adv, mask = torch.tensor([-1.0, 1.0]), torch.ones(2, 3, dtype=torch.bool)
    loss, _ = grpo.policy_loss(logp, logp_old, adv, mask, **opts)
    want = (-adv.unsqueeze(-1) * logp.exp()).mean()
    torch.testing.assert_close(loss, want)
    dual, _ = grpo.policy_loss(logp, logp_old, adv, mask, clip_low=None, clip_high=None,
                               clip_ratio_c=3.0)
    assert not torch.allclose(dual, want)  # what the leak used to change
