"""vp2o.config: loading, overrides, and every rejection message (before any process group)."""

from __future__ import annotations

import pytest

from vp2o.config import Config, ConfigError, load_config


def test_defaults_validate():
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    assert cfg.model.num_experts == 8 and cfg.model.moe_router_topk == 2


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "model:\n  num_experts: 16\n  moe_layer_freq: [1, 0, 1, 0]\noptimizer:\n  lr: 3e-4\n"
    )
    cfg = load_config(path, ["model.moe_router_topk=4", "parallel.expert_parallel=2"], world_size=2)
    assert cfg.model.num_experts == 16
    assert cfg.model.moe_layer_pattern == [1, 0, 1, 0]
    assert cfg.optimizer.lr == pytest.approx(3e-4)  # YAML 1.1 reads "3e-4" as a string
    assert cfg.model.moe_router_topk == 4 and cfg.parallel.expert_parallel == 2
    assert load_config(None, ["model.num_query_groups=null"]).model.num_query_groups is None


@pytest.mark.parametrize(
    ("overrides", "world", "message"),
    [
        (["model.num_expert=8"], None,
         "model.num_expert: unknown key; did you mean model.num_experts? expected one of:"),
        (["model.zzz=8"], None, "model.zzz: unknown key; expected one of:"),  # nothing close
        (["model..x=8"], None, "model.: an empty key; expected one of:"),
        (["modle.num_experts=8"], None, "modle: unknown key"),
        (["model.num_experts=eight"], None, "model.num_experts = 'eight': expected an integer"),
        (["model.num_experts=8.5"], None, "model.num_experts = 8.5: expected an integer"),
        (["model.qk_layernorm=3"], None, "model.qk_layernorm = 3: expected true or false"),
        (
            ["model.moe_router_score_function=relu"],
            None,
            "model.moe_router_score_function = 'relu': expected one of 'softmax', 'sigmoid'",
        ),
        (["model.moe_router_topk=9"], None, "model.moe_router_topk = 9: expected 1 <= top-k"),
        (
            ["parallel.expert_parallel=3"],
            None,
            "model.num_experts = 8: expected divisible by parallel.expert_parallel (3)",
        ),
        (
            ["parallel.tensor_parallel=3"],
            3,
            "model.num_attention_heads = 4: expected divisible by parallel.tensor_parallel (3)",
        ),
        (
            ["parallel.tensor_parallel=2"],
            2,
            "parallel.sequence_parallel = False: expected true: megatron-core MoE",
        ),
        (
            ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"],
            3,
            "expected a product that divides the world size (3)",
        ),
        (["parallel.expert_parallel=4"], 2, "parallel.expert_parallel = 4: expected EP x ETP"),
        (
            ["parallel.pipeline_parallel=3"],
            None,
            "model.num_layers = 4: expected divisible by parallel.pipeline_parallel (3)",
        ),
        (
            ["model.num_query_groups=3"],
            None,
            "model.num_query_groups = 3: expected a divisor of model.num_attention_heads",
        ),
        (
            ["model.moe_layer_freq=[1,0]"],
            None,
            "model.moe_layer_freq = [1, 0]: expected a list of 4",
        ),
        (["model.moe_layer_freq=[0,0,0,0]"], None, "expected at least one MoE layer"),
        (["optimizer.name=sgd"], None, "parallel.use_distributed_optimizer = True: expected false"),
        (
            ["parallel.overlap_param_gather=true"],
            None,
            "parallel.overlap_param_gather = True: expected false (the RL loop reads",
        ),
        (["model.moe_aux_loss_coeff=0.01"], None, "model.moe_router_load_balancing_type = 'none'"),
        (
            ["algorithm=vp2o", "model.moe_token_dispatcher_type=allgather"],
            None,
            "model.moe_token_dispatcher_type = 'allgather': expected alltoall when algorithm=vp2o",
        ),
        (
            ["algorithm=vp2o", "model.moe_token_dispatcher_type=flex"],
            None,
            "model.moe_token_dispatcher_type = 'flex': expected alltoall when algorithm=vp2o",
        ),
        (["train.keep_last=0"], None, "train.keep_last = 0: expected >= 1"),
        (["reward.workers=-1"], None, "reward.workers = -1: expected >= 0"),
        (["reward.timeout_s=0"], None, "reward.timeout_s = 0.0: expected > 0"),
        (["reward.name=exakt"], None, "reward.name = 'exakt': expected one of choice, code, exact"),
        (["loss.aggregation=tokenmean"], None,
         "loss.aggregation = 'tokenmean': expected one of seq_mean_token_mean"),
        (["loss.kl_estimator=k9"], None, "loss.kl_estimator = 'k9': expected one of k1, k2, k3"),
        (["data.task=jsonl", "data.train_path=t.jsonl"], None,
         "data.eval_path = None: expected a JSONL file of held-out rows when data.task=jsonl"),
        (["data.eval_path=e.jsonl"], None,
         "data.eval_path = 'e.jsonl': expected null with the built-in task"),
        (["data.num_eval_prompts=0"], None, "data.num_eval_prompts = 0: expected >= 1"),
        (["data.tokenizer_vocab_size=4"], None, "data.tokenizer_vocab_size = 4: expected >= 5"),
        (["optimizer.lr=.nan"], None, "optimizer.lr = nan: expected a finite number > 0"),
        (["optimizer.lr=-0.1"], None, "optimizer.lr = -0.1: expected a finite number > 0"),
        (["optimizer.min_lr=0.1"], None, "optimizer.min_lr = 0.1: expected in [0, optimizer.lr"),
        (["optimizer.adam_beta2=1.0"], None, "optimizer.adam_beta2 = 1.0: expected in [0, 1)"),
        (["optimizer.clip_grad=-1"], None, "optimizer.clip_grad = -1.0: expected a finite"),
        (["parallel.expert_tensor_parallel=0"], None,
         "parallel.expert_tensor_parallel = 0: expected an integer >= 1, or null"),
        (["train.max_consecutive_skips=0"], None, "train.max_consecutive_skips = 0: expected >= 1"),
        (["sft.batch_size=0"], None, "sft.batch_size = 0: expected >= 1"),
        (["rollout.top_k=-1"], None, "rollout.top_k = -1: expected >= 0"),
        (['rollout.stop_strings=["x", ""]'], None, "expected non-empty strings"),
        (["loss.kl_coeff=-0.1"], None, "loss.kl_coeff = -0.1: expected >= 0"),
        (["loss.clip_ratio_c=1.0"], None, "loss.clip_ratio_c = 1.0: expected null or > 1"),
        (["algorithm=vp2o", "loss.estimator=logprob", "loss.clip=true"], None,
         "loss.clip = True: expected false or null with loss.estimator=logprob"),
        (["algorithm=vp2o", "loss.estimator=logprob", "loss.clip_ratio_c=3"], None,
         "loss.clip_ratio_c = 3.0: expected null with loss.estimator=logprob"),
        (["algorithm=grpo", "loss.estimator=logprob", "loss.clip=true"], None,
         "loss.clip = True: expected false or null with loss.estimator=logprob"),
        (["loss.clip=false", "loss.clip_ratio_c=3"], None,
         "loss.clip_ratio_c = 3.0: expected null when the ratio is not clipped (loss.clip = "
         "False with algorithm=grpo"),
        (["algorithm=vp2o", "loss.clip_ratio_c=3"], None,
         "loss.clip_ratio_c = 3.0: expected null when the ratio is not clipped (loss.clip = "
         "None with algorithm=vp2o"),
        (["algorithm=vp2o", "loss.estimator=logprob", "train.updates_per_rollout=4"], None,
         "train.updates_per_rollout = 4: expected 1 with loss.estimator=logprob"),
        (["train.updates_per_rollout=null"], None,
         "train.updates_per_rollout = None: expected an integer"),
        (["loss.estimator=logprob", "train.updates_per_rollout=2"], None,
         "train.updates_per_rollout = 2: expected 1 with loss.estimator=logprob"),
        (["loss.estimator=ppo"], None,
         "loss.estimator = 'ppo': expected one of 'ratio', 'logprob', 'gspo'"),
        (["loss.clip=3"], None, "loss.clip = 3: expected true or false or null"),
        (["train.updates_per_rollout=0"], None,
         "train.updates_per_rollout = 0: expected >= 1 (learner updates per rollout batch)"),
        (["rollout.router_replay=true"], None,
         "model.moe_enable_routing_replay = False: expected true when rollout.router_replay"),
        (["data.task=csv"], None, "data.task = 'csv': expected one of 'arith', 'skills', 'jsonl'"),
        (["model.position_embedding_type=learned_absolute", "model.max_position_embeddings=64"],
         None, "model.max_position_embeddings = 64: expected >= data.max_prompt_tokens + "
         "rollout.max_new_tokens (80)"),
        (["model.moe_router_topk=1"], None,
         "model.moe_router_pre_softmax = False: expected true when model.moe_router_topk = 1"),
        (["data.num_train_prompts=11900", "data.num_eval_prompts=101"], None,
         "data.num_train_prompts = 11900: expected at most 12000 - data.num_eval_prompts"),
        (["algorithm=vp2o", "vp2o.behavior.ess_min=1.5"], None,
         "vp2o.behavior.ess_min = 1.5: expected in [0, 1]"),
        (["algorithm=vp2o", "vp2o.behavior.eps_drift=-0.1"], None,
         "vp2o.behavior.eps_drift = -0.1: expected >= 0"),
        (["algorithm=vp2o", "vp2o.trust_region.delta=-0.01"], None,
         "vp2o.trust_region.delta = -0.01: expected >= 0"),
        (["algorithm=vp2o", "vp2o.ortho_coeff=-1"], None,
         "vp2o.ortho_coeff = -1.0: expected a finite number >= 0"),
        # ranges nothing checked before (found by an audit of accepted nonsense)
        (["seed=4294967295"], None, "seed = 4294967295: expected an integer in [0, 2**31)"),
        (["seed=-1"], None, "seed = -1: expected an integer in [0, 2**31)"),
        (["parallel.sequence_parallel=true"], None,
         "parallel.sequence_parallel = True: expected false with parallel.tensor_parallel = 1"),
        (["model.make_vocab_size_divisible_by=0"], None,
         "model.make_vocab_size_divisible_by = 0: expected an integer >= 1"),
        (["model.kv_channels=-4"], None, "model.kv_channels = -4: expected an integer >= 1"),
        (["model.kv_channels=0"], None, "model.kv_channels = 0: expected an integer >= 1"),
        (["model.moe_shared_expert_intermediate_size=-5"], None,
         "model.moe_shared_expert_intermediate_size = -5: expected an integer >= 1, or null"),
        (["model.attention_dropout=1.5"], None,
         "model.attention_dropout = 1.5: expected a probability in [0, 1)"),
        (["model.hidden_dropout=-0.1"], None, "model.hidden_dropout = -0.1: expected a"),
        (["model.norm_epsilon=nan"], None, "model.norm_epsilon = nan: expected a finite"),
        (["model.rotary_percent=2"], None, "model.rotary_percent = 2.0: expected a fraction"),
        (["model.max_position_embeddings=0"], None, "model.max_position_embeddings = 0: expected"),
        (["model.moe_aux_loss_coeff=-1"], None, "model.moe_aux_loss_coeff = -1.0: expected a"),
        (["rollout.temperature=inf"], None, "rollout.temperature = inf: expected a finite number"),
        (["optimizer.adam_eps=inf"], None, "optimizer.adam_eps = inf: expected a finite number"),
        (["algorithm=vp2o", "vp2o.alpha=inf"], None, "vp2o.alpha = inf: expected a finite"),
        (["algorithm=vp2o", "vp2o.behavior.lam=inf"], None, "vp2o.behavior.lam = inf: expected"),
        (["loss.mis_high=0.9"], None, "loss.mis_high = 0.9: expected > 1"),
        (["loss.mis_low=1"], None, "loss.mis_low = 1.0: expected in [0, 1)"),
        # a list's own error names the item, not "an integer or a list"
        (["model.moe_layer_freq=[1,0.5,1,0]"], None, "model.moe_layer_freq[1] = 0.5: expected an"),
        (["model.moe_shared_expert_gate=true"], None,
         "model.moe_shared_expert_intermediate_size = None: expected > 0 with "
         "model.moe_shared_expert_gate=true"),
        (["model"], None, "override 'model': expected key.sub=value"),
        (["seed.x=1"], None, "seed = {'x': 1}: expected an integer"),
        (["model.num_layers.x=1"], None, "model.num_layers = {'x': 1}: expected an integer"),
    ],
)
def test_rejections_name_key_value_and_expectation(overrides, world, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides, world_size=world)
    assert message in str(err.value)


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  num_experts: 8\n  hidden_size: [128\n")
    with pytest.raises(ConfigError, match=rf"{path.name}:\d+:\d+: malformed YAML"):
        load_config(path)
    path.write_text("seed: 1\nmodel:\n  num_layers: 2\x1f\n")  # the YAML reader refuses it
    with pytest.raises(ConfigError, match=rf"{path.name}:3:16: malformed YAML: control "
                                          "character #x001f"):
        load_config(path)
    path.write_bytes(b"seed: 1\nmodel:\n  name: caf\xe9\n")  # Latin-1, not UTF-8
    with pytest.raises(ConfigError, match=rf"{path.name}:3:12: not valid UTF-8 text"):
        load_config(path)
    path.write_text("model:\n  num_layers: 'two\n  hidden_size: 64\n")  # context: where it began
    with pytest.raises(ConfigError, match=r"while scanning a quoted scalar at line 2"):
        load_config(path)
    path.write_text("base: &b\n  num_layers: 2\nmodel:\n  <<: *b\n")
    with pytest.raises(ConfigError, match=rf"{path.name}:4:\d+: malformed YAML: merge keys"):
        load_config(path)


def test_missing_file_and_wrong_top_level(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="is not a regular file"):
        load_config(tmp_path)
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(path)
    path.write_text("model: 3\n")
    with pytest.raises(ConfigError, match="model: expected a mapping, got int"):
        load_config(path)
    for empty in ("", "\n  \n", "# only a comment\n", "---\n"):
        path.write_text(empty)
        with pytest.raises(ConfigError, match=f"{path}: holds no settings"):
            load_config(path)


@pytest.mark.parametrize("dispatcher", ["allgather", "flex"])
def test_other_dispatchers_load_where_no_orthogonality_loss_needs_them(dispatcher):
    """The dispatcher check is about the orthogonality loss (it reads each token's expert outputs
    before megatron sums them, which only alltoall hands over): GRPO, and VP2O with the loss
    off, accept the others."""
    key = f"model.moe_token_dispatcher_type={dispatcher}"
    assert load_config(None, ["algorithm=grpo", key]).model.moe_token_dispatcher_type == dispatcher
    cfg = load_config(None, ["algorithm=vp2o", "vp2o.ortho_coeff=0", key])
    assert cfg.model.moe_token_dispatcher_type == dispatcher


def test_a_dotted_reward_path_is_left_to_run_time():
    """Only registered names are checked at load; a dotted path is imported when scoring starts
    (importing user code while validating a config would run it on a login node too)."""
    assert load_config(None, ["reward.name=mypkg.rewards:score"]).reward.name == \
        "mypkg.rewards:score"


def test_the_built_in_task_refuses_more_prompts_than_it_has():
    """12,000 distinct prompts: asking for more used to loop forever while drawing them."""
    from vp2o.config import DataConfig
    from vp2o.data.tasks import ARITH_PROMPTS, DatasetError, load_task

    # load_config refuses it (see the rejections above); the loader guards itself as well.
    data = DataConfig(num_train_prompts=ARITH_PROMPTS, num_eval_prompts=1)
    with pytest.raises(DatasetError, match=r"num_eval_prompts = 12001: expected at most 12000"):
        load_task(data, seed=0)
    fits = load_config(None, [f"data.num_train_prompts={ARITH_PROMPTS - 5}",
                              "data.num_eval_prompts=5"])
    split = load_task(fits.data, seed=0)
    assert len({r["prompt"] for r in split.train + split.eval}) == ARITH_PROMPTS


def test_a_key_given_twice_in_a_yaml_file_is_refused_with_its_line(tmp_path):
    """Plain YAML keeps the last of two equal keys without a word."""
    path = tmp_path / "dup.yaml"
    path.write_text("model:\n  num_layers: 2\n  hidden_size: 64\n  num_layers: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == f"{path}:4:3: malformed YAML: duplicate key 'num_layers'"
    path.write_text("model:\n  num_layers: 2\nrollout:\n  group_size: 4\n")
    assert load_config(path).model.num_layers == 2


# ------------------------------------------------------------------ the loss section


@pytest.mark.parametrize(("old", "new"), [
    ("grpo.clip_low=0.1", "loss.clip_low"), ("grpo.clip_high=0.28", "loss.clip_high"),
    ("grpo.clip_ratio_c=3", "loss.clip_ratio_c"), ("grpo.kl_coeff=0.1", "loss.kl_coeff"),
    ("grpo.kl_estimator=k1", "loss.kl_estimator"), ("grpo.aggregation=token_mean",
                                                    "loss.aggregation"),
    ("grpo.overlong_filter=true", "loss.overlong_filter"), ("grpo.loss_type=gspo",
                                                            "loss.estimator"),
    ("grpo.normalize_std=false", "advantage.normalize_std"),
    ("grpo.dynamic_sampling=true", "advantage.dynamic_sampling"),
    ("grpo.router_replay=true", "rollout.router_replay"),
    ("grpo.updates_per_rollout=2", "train.updates_per_rollout"),
    ("vp2o.clip=true", "loss.clip"), ("vp2o.pg_estimator=logprob", "loss.estimator"),
    ("vp2o.max_updates_per_rollout=2", "train.updates_per_rollout"),
])
def test_a_moved_key_is_refused_naming_its_new_key(tmp_path, old, new):
    """The keys of the schema before the loss section, from an override and from a file: an old
    config fails at load naming the new key (it would otherwise be an unknown key, or worse, an
    option the algorithm that runs ignores)."""
    key = old.split("=")[0]
    with pytest.raises(ConfigError, match=rf"^{key}: moved to {new}\b"):
        load_config(None, ["algorithm=vp2o", old])
    section, name = key.split(".")
    path = tmp_path / "old.yaml"
    path.write_text(f"seed: 1\n{section}:\n  {name}: {old.split('=')[1]}\n")
    with pytest.raises(ConfigError, match=rf"^{path}:3: {key}: moved to {new}\b"):
        load_config(path)


def test_the_grpo_section_is_gone():
    for overrides in (["grpo.clip=0.2"], ["grpo={}"]):
        with pytest.raises(ConfigError, match=r"^grpo: the section is gone: the policy loss is "
                                              r"the loss section"):
            load_config(None, overrides)


def test_loss_clip_and_updates_per_rollout_resolve_per_algorithm():
    """One update per batch by default in both algorithms (the same data and compute budget);
    loss.clip null is the safe default: GRPO clips; VP2O clips only when it reuses a batch
    (the reused updates need an off-policy correction), not at one update (§2: the trust
    regions bound the step); an explicit value applies to either algorithm."""
    grpo, vp2o = load_config(None, ["algorithm=grpo"]), load_config(None, ["algorithm=vp2o"])
    assert (grpo.loss.clip, grpo.loss_clips, grpo.updates_per_rollout) == (None, True, 1)
    assert (vp2o.loss.clip, vp2o.loss_clips, vp2o.updates_per_rollout) == (None, False, 1)
    assert load_config(None, ["algorithm=vp2o", "train.updates_per_rollout=2"]).loss_clips
    assert not load_config(None, ["algorithm=vp2o", "train.updates_per_rollout=2",
                                  "loss.clip=false"]).loss_clips
    both = ["loss.clip=true", "train.updates_per_rollout=2"]
    assert load_config(None, ["algorithm=vp2o", *both]).loss_clips
    assert load_config(None, ["algorithm=vp2o", *both]).updates_per_rollout == 2
    assert not load_config(None, ["algorithm=grpo", "loss.clip=false"]).loss_clips
    logprob = load_config(None, ["algorithm=grpo", "loss.estimator=logprob"])
    assert not logprob.loss_clips and logprob.updates_per_rollout == 1  # no ratio to clip
    vp2o_logprob = ["algorithm=vp2o", "loss.estimator=logprob", "train.updates_per_rollout=1"]
    assert load_config(None, vp2o_logprob).loss.estimator == "logprob"
    gspo = load_config(None, ["algorithm=vp2o", "loss.estimator=gspo", "loss.clip=true",
                              "loss.clip_ratio_c=3"])
    assert gspo.loss_clips and gspo.loss.clip_ratio_c == 3.0  # applies to VP2O too


# ------------------------------------------------------------------ files and includes


def test_defaults_merge_in_order_and_the_including_file_wins(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model.yaml").write_text(
        "model:\n  num_layers: 2\n  hidden_size: 64\nseed: 1\n")
    (tmp_path / "base" / "more.yaml").write_text(
        "model:\n  num_layers: 6\nrollout:\n  stop_strings: [a, b]\nseed: 2\n")
    path = tmp_path / "run.yaml"
    path.write_text("defaults: [base/model.yaml, base/more.yaml]\nseed: 3\n"
                    "rollout:\n  stop_strings: [c]\n")
    cfg = load_config(path, ["model.hidden_size=128"])
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.seed) == (6, 128, 3)
    assert cfg.rollout.stop_strings == ["c"]  # lists are replaced, not appended
    # A single file may be named without a list; includes nest (relative to each file).
    (tmp_path / "base" / "nested.yaml").write_text(
        "defaults: model.yaml\nmodel:\n  num_layers: 4\n")
    path.write_text("defaults: base/nested.yaml\n")
    cfg = load_config(path)
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.seed) == (4, 64, 1)


def test_defaults_errors_name_the_file(tmp_path):
    path = tmp_path / "a.yaml"
    path.write_text("seed: 1\ndefaults: [missing.yaml]\n")
    with pytest.raises(ConfigError, match=rf"^{path}:2: defaults: 'missing.yaml' does not exist "
                                          rf"\(looked for {tmp_path / 'missing.yaml'}\)"):
        load_config(path)
    (tmp_path / "b.yaml").write_text("defaults: [a.yaml]\n")
    path.write_text("defaults: [b.yaml]\n")
    with pytest.raises(ConfigError, match=r"b.yaml:1: defaults include a cycle: .*a.yaml -> "
                                          r".*b.yaml -> .*a.yaml"):
        load_config(path)
    path.write_text("defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match="defaults include a cycle"):
        load_config(path)
    path.write_text("defaults: {x: 1}\n")
    with pytest.raises(ConfigError, match=rf"^{path}:1: defaults = {{'x': 1}}: expected a list "
                                          r"of YAML files \(paths relative to a.yaml\)"):
        load_config(path)
    with pytest.raises(ConfigError, match="defaults is read from YAML files only"):
        load_config(None, ["defaults=[a.yaml]"])
    (tmp_path / "bad.yaml").write_text("model:\n  num_layers: [2\n")
    path.write_text("defaults: [bad.yaml]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+:\d+: malformed YAML"):
        load_config(path)


def test_a_bad_value_is_named_with_the_file_and_line_that_set_it(tmp_path):
    """With includes, the key alone does not say which file to fix."""
    (tmp_path / "base.yaml").write_text("seed: 1\noptimizer:\n  lr: -1.0\n  name: adam\n")
    path = tmp_path / "run.yaml"
    path.write_text("defaults: [base.yaml]\nmodel:\n  num_layers: 2\n  num_expert: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{path}:4: model.num_expert: unknown key; did you mean")
    path.write_text("defaults: [base.yaml]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{tmp_path / 'base.yaml'}:3: optimizer.lr = -1.0: expected a "
                              "finite number > 0")
    with pytest.raises(ConfigError) as err:  # an override replaces the file's value: no place
        load_config(path, ["optimizer.lr=-2"])
    assert str(err.value) == "optimizer.lr = -2.0: expected a finite number > 0"
    assert load_config(path, ["optimizer.lr=1e-4"]).optimizer.lr == pytest.approx(1e-4)


# ------------------------------------------------------------------ checked once


def test_require_loop_checks_once_and_again_after_a_change(monkeypatch):
    """load_config(loop=...) checks the loop's rules; require_loop on that config does nothing;
    a config changed in place, or built in Python, is checked."""
    from vp2o.config import loops

    calls = []
    real = loops.check_loop
    monkeypatch.setattr("vp2o.config.check_loop",
                        lambda loop, **kw: (calls.append(loop), real(loop, **kw)))
    cfg = load_config(None, loop="train")
    assert calls == ["train"]
    assert cfg.require_loop("train") is cfg and calls == ["train"]
    cfg.require_loop("eval")
    assert calls == ["train", "eval"]
    cfg.rollout.temperature = 0.0  # fine for eval with one sample, not for RL training
    cfg.require_loop("eval")
    with pytest.raises(ConfigError, match="rollout.temperature = 0.0: expected > 0 for vp2o "
                                          "train"):
        cfg.require_loop("train")
    built = Config()
    built.optimizer.lr = float("nan")
    with pytest.raises(ConfigError, match="optimizer.lr = nan"):
        built.require_loop("sft")
    with pytest.raises(ConfigError, match="loop = 'rl': expected one of sft, train, eval"):
        Config().require_loop("rl")
    with pytest.raises(ConfigError, match="parallel.context_parallel = 2: expected 1"):
        load_config(None, ["parallel.context_parallel=2"], loop="sft")


def test_data_parallel_size_is_computed_in_one_place():
    p = load_config(None, ["parallel.expert_parallel=2"]).parallel
    assert (p.data_parallel(8), p.expert_data_parallel(8)) == (8, 4)
    tp2 = ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"]
    p = load_config(None, tp2).parallel
    assert p.data_parallel(8) == 4
    with pytest.raises(ConfigError, match=r"parallel = 'TP=2 x PP=1 x CP=1': expected a product "
                                          r"that divides the world size \(3\)"):
        p.data_parallel(3)


def test_an_unreadable_config_file_is_a_config_error(tmp_path, monkeypatch):
    """Permissions (as root nothing is unreadable, so the read fails on purpose here)."""
    from pathlib import Path

    path = tmp_path / "run.yaml"
    path.write_text("seed: 1\n")

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(ConfigError, match=rf"{path}: cannot read the config file \(Permission"):
        load_config(path)
