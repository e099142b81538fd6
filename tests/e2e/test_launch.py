"""The SLURM scripts, the example configs and ``vp2o launch --dry-run`` (fast, no processes)."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from vp2o.cli import parse_args
from vp2o.config import ConfigError, load_config, to_dict
from vp2o.launch import Layout

ROOT = Path(__file__).resolve().parents[2]
SLURM = ROOT / "examples" / "vp2o" / "slurm"
CONFIGS = ROOT / "examples" / "vp2o" / "configs"
SCRIPTS = sorted(SLURM.glob("*.sbatch")) + [SLURM / "common.sh"]


def _shellcheck() -> str | None:
    local = ROOT / ".venv" / "bin" / "shellcheck"
    return str(local) if local.exists() else shutil.which("shellcheck")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_are_shellcheck_clean(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    tool = _shellcheck()
    if tool is None:
        pytest.skip("shellcheck not installed")
    proc = subprocess.run([tool, "-x", str(script.relative_to(ROOT))], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", sorted(SLURM.glob("*.sbatch")), ids=lambda p: p.name)
def test_sbatch_requeues_on_usr1_and_uses_an_existing_config(script):
    text = script.read_text()
    for line in ("#SBATCH --requeue", "#SBATCH --signal=USR1@120", "#SBATCH --nodes=",
                 "#SBATCH --gpus-per-node="):
        assert line in text, line
    config = text.split("examples/vp2o/configs/")[-1].split("}")[0]
    assert (CONFIGS / config).is_file(), config
    common = (SLURM / "common.sh").read_text()
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1' in common
    assert "--node_rank=\"$SLURM_NODEID\"" in common and "train.resume=auto" in common


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_loads(path):
    cfg = load_config(path, loop="sft" if path.name == "demo_sft.yaml" else "train")
    if path.name.startswith("qwen3_30b_a3b"):
        m = cfg.model
        assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups,
                m.head_dim, m.num_experts, m.moe_router_topk, m.moe_ffn_hidden_size,
                m.vocab_size, m.qk_layernorm, m.rotary_base) == (
                    48, 2048, 32, 4, 128, 128, 8, 768, 151936, True, 1_000_000)
        assert m.params_dtype == "bf16" and cfg.parallel.use_distributed_optimizer
        world = (8 if "_8k" in path.name else 16) * 8
        load_config(path, world_size=world, loop="train")
        assert cfg.rollout.max_new_tokens == (8192 if "_8k" in path.name else 16384)


@pytest.mark.parametrize("prefix", ["qwen3_30b_a3b_{}_8k", "qwen3_30b_a3b_{}_16k", "demo_{}"])
def test_the_grpo_and_vp2o_arms_differ_only_in_the_algorithm(prefix):
    """Each pair of arms includes one shared file (``defaults:``) and sets only the algorithm and
    the run folder: the loss, the data, the layout and even VP2O's settings (which shape the
    diagnostics GRPO logs) are the same for both, so the arms cannot drift apart by an edit to
    one file. What the algorithm decides differs only through the resolved values."""
    grpo, vp2o = (load_config(CONFIGS / f"{prefix.format(arm)}.yaml") for arm in ("grpo", "vp2o"))
    a, b = to_dict(grpo), to_dict(vp2o)
    assert (a.pop("algorithm"), b.pop("algorithm")) == ("grpo", "vp2o")
    assert "grpo" in a["train"].pop("run_dir")
    assert "vp2o" in b["train"].pop("run_dir")
    assert a == b
    if prefix.startswith("qwen3"):  # batch reuse, the same for both, with the clip in both
        assert (grpo.updates_per_rollout, vp2o.updates_per_rollout) == (4, 4)
        assert grpo.loss_clips and vp2o.loss_clips
        assert grpo.loss.clip_high == 0.28 and grpo.loss.overlong_filter
        assert grpo.vp2o.behavior.ess_level == "token"  # both lengths alike (docs/algorithm.md)
        assert grpo.optimizer.decay_style == "cosine"
    else:  # the demo takes one learner step per batch in both modes; VP2O does not clip then
        assert (grpo.updates_per_rollout, vp2o.updates_per_rollout) == (1, 1)
        assert grpo.loss_clips and not vp2o.loss_clips


@pytest.mark.parametrize("phase", ["sft", "grpo", "vp2o"])
def test_the_demo_runs_its_config_files(phase, tmp_path):
    """vp2o demo's settings are demo_<phase>.yaml's; another root moves only the folders."""
    from vp2o.demo import demo_config

    file = to_dict(load_config(CONFIGS / f"demo_{phase}.yaml"))
    assert to_dict(demo_config(phase)) == file
    moved = to_dict(demo_config(phase, tmp_path, ["rollout.group_size=4"]))
    folders = {("train", "run_dir"): tmp_path / phase}
    if phase != "sft":
        folders[("data", "tokenizer_path")] = tmp_path / "sft" / "tokenizer.model"
        folders[("train", "init_checkpoint")] = tmp_path / "sft" / "checkpoints"
    for (section, key), path in folders.items():
        assert moved[section].pop(key) == str(path)
        file[section].pop(key)
    assert moved["rollout"].pop("group_size") == 4
    file["rollout"].pop("group_size")
    assert moved == file


def _dry_run(*argv: str) -> str:
    args = parse_args(["launch", *argv])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert args.func(args) == 0
    return out.getvalue()


def test_dry_run_two_nodes_prints_each_node_and_rank():
    out = _dry_run("--dry-run", str(CONFIGS / "small_1node_vp2o.yaml"), "--nodes", "2",
                   "--gpus-per-node", "4", "--hosts", "gpu-a,gpu-b", "--port", "23456",
                   "parallel.tensor_parallel=2", "parallel.sequence_parallel=true",
                   "parallel.expert_parallel=2")
    lines = out.splitlines()
    assert lines[0] == "layout: world=8 TP=2 PP=1 CP=1 EP=2 ETP=1 DP=4 expert-DP=4"
    assert lines[1].startswith("batch: sequences/rank/step=64 micro_batch_size=32 "
                               "micro-batches=2")
    for node, host in enumerate(("gpu-a", "gpu-b")):
        line = lines[2 + node]
        assert line.startswith(f"node {node} ({host}): python -m vp2o.launch --nnodes=2 "
                               f"--nproc_per_node=4 --node_rank={node} --rdzv_backend=static "
                               "--rdzv_endpoint=gpu-a:23456 -m vp2o.cli train --config ")
        assert line.endswith("parallel.expert_parallel=2")
    ranks = lines[4:12]
    assert len(ranks) == 8
    # the plan is printed; that vp2o train refuses TP = 2 when it starts is said after it
    assert lines[12:] == ["note: vp2o train refuses this config when it starts: "
                          "parallel.tensor_parallel = 2: expected 1 for vp2o train/eval (their "
                          "rollout generation runs TP = PP = 1, docs/rollout.md)"]
    for rank, line in enumerate(ranks):
        host = "gpu-a" if rank < 4 else "gpu-b"
        assert line == (f"rank {rank}: host={host} local_rank={rank % 4} tp={rank % 2} cp=0 "
                        f"dp={rank // 2} pp=0 ep={rank % 2} etp=0 edp={rank // 2}")


@pytest.mark.parametrize(("option", "message"), [
    (["--port", "99999"], "expected a TCP port, an integer in 1-65535"),
    (["--port", "-1"], "expected a TCP port"),
    (["--hosts", ",,,", "--nodes", "2"], "--hosts ',,,': expected comma-separated host names"),
])
def test_dry_run_rejects_a_bad_port_or_empty_hosts(option, message, capsys):
    config = str(CONFIGS / "small_1node_vp2o.yaml")
    with pytest.raises((ConfigError, SystemExit)) as err:
        args = parse_args(["launch", "--dry-run", config, *option])
        args.func(args)
    assert message in (str(err.value) + capsys.readouterr().err)


def test_dry_run_rejects_a_layout_that_does_not_divide():
    args = parse_args(["launch", "--dry-run", str(CONFIGS / "qwen3_30b_a3b_vp2o_8k.yaml"),
                              "--nodes", "1", "--gpus-per-node", "6"])
    with pytest.raises(ConfigError, match="parallel.expert_parallel = 8"):
        args.func(args)


def test_dry_run_rejects_context_parallelism():
    """The loops give every rank whole sequences: CP > 1 would train on wrong attention under
    transformer-engine without an error, so the plan is refused before any node starts."""
    with pytest.raises(ConfigError, match="parallel.context_parallel = 2: expected 1"):
        _dry_run("--dry-run", str(CONFIGS / "small_1node_vp2o.yaml"), "--nodes", "1",
                 "--gpus-per-node", "4", "parallel.context_parallel=2")
    # The same layout with CP = 1 plans (the refusal is about CP, not the world size).
    assert _dry_run("--dry-run", str(CONFIGS / "small_1node_vp2o.yaml"), "--nodes", "1",
                    "--gpus-per-node", "4").startswith("layout: world=4 ")


@pytest.fixture
def no_session(monkeypatch):
    """Records process-group starts (there must be none)."""
    from vp2o import session as session_module

    started = []
    monkeypatch.setattr(session_module.parallel, "initialize", lambda cfg: started.append(cfg))
    return started


@pytest.mark.parametrize("verb", ["sft", "train", "eval"])
def test_every_loop_refuses_context_parallelism_before_starting(no_session, verb):
    """sft/train/eval refuse CP > 1 before any process group exists (a config loaded without a
    loop, or built in Python, is checked when the loop starts)."""
    from vp2o import evaluate as evaluate_module
    from vp2o import sft as sft_module
    from vp2o import train as train_module

    run = {"sft": sft_module.sft, "train": train_module.train,
           "eval": evaluate_module.run_eval}[verb]
    cfg = load_config(None, ["parallel.context_parallel=2"])
    with pytest.raises(ConfigError, match="parallel.context_parallel = 2: expected 1"):
        run(cfg)
    with pytest.raises(ConfigError, match="parallel.context_parallel = 2: expected 1"):
        load_config(None, ["parallel.context_parallel=2"], loop=verb)
    assert no_session == []


@pytest.mark.parametrize("override", ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"])
@pytest.mark.parametrize("verb", ["train", "eval"])
def test_generating_loops_refuse_tp_and_pp_before_starting(monkeypatch, verb, override):
    """train and eval generate, and generation runs TP = PP = 1: they refuse the layout before any
    process group or model exists (it used to stop at the first rollout), naming the key."""
    from vp2o import evaluate as evaluate_module
    from vp2o import session as session_module
    from vp2o import train as train_module
    from vp2o.config import load_config

    started = []
    monkeypatch.setattr(session_module.parallel, "initialize", lambda cfg: started.append(cfg))
    sequence_parallel = "tensor_parallel" in override  # megatron's MoE needs it with TP > 1
    cfg = load_config(None, [override, f"parallel.sequence_parallel={sequence_parallel}"])
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"{key} = 2: expected 1 for vp2o train/eval"):
        if verb == "train":
            train_module.train(cfg)
        else:
            evaluate_module.run_eval(cfg)
    assert started == []
    # SFT does not generate: the same layout gets past the check (to the process groups).
    cfg.require_loop("sft")


@pytest.mark.parametrize(("override", "message"), [
    ("model.hidden_dropout=0.1", "model.hidden_dropout = 0.1: expected 0 for vp2o train"),
    ("model.attention_dropout=0.1", "model.attention_dropout = 0.1: expected 0 for vp2o train"),
    ("rollout.temperature=0", "rollout.temperature = 0.0: expected > 0 for vp2o train"),
    ("model.params_dtype=fp16", "model.params_dtype = 'fp16': expected fp32 or bf16"),
])
def test_rl_training_refuses_settings_it_would_run_wrongly(no_session, override, message):
    """Dropout made every step off-policy (behaviour log-probs are taken in eval mode), greedy
    sampling gave every advantage 0, fp16 without a loss scale learnt nothing: all ran without
    an error before; now vp2o train refuses them before anything starts."""
    from vp2o import train as train_module
    from vp2o.config import load_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        train_module.train(load_config(None, [override]))
    assert no_session == []


def test_sft_and_eval_accept_what_only_rl_training_refuses(no_session):
    """Dropout and greedy decoding are fine for SFT and evaluation; fp16 is refused by all."""
    from vp2o.config import load_config

    cfg = load_config(None, ["model.hidden_dropout=0.1", "rollout.temperature=0"])
    cfg.require_loop("eval")
    cfg.require_loop("sft")
    with pytest.raises(ConfigError, match=r"rollout.temperature = 0.0: expected > 0 with "
                                          r"train.eval_samples = 4 \(greedy samples"):
        load_config(None, ["train.eval_samples=4", "rollout.temperature=0"], loop="eval")
    fp16 = load_config(None, ["model.params_dtype=fp16"])
    with pytest.raises(ConfigError, match="model.params_dtype = 'fp16'"):
        fp16.require_loop("sft")


@pytest.mark.parametrize(("tp", "pp", "cp", "ep", "world"),
                         [(2, 1, 1, 4, 16), (2, 2, 2, 2, 16), (1, 2, 1, 8, 16), (4, 1, 2, 2, 32)])
def test_rank_coordinates_follow_megatron_rank_generator(tp, pp, cp, ep, world):
    from megatron.core.parallel_state import RankGenerator

    dp = world // (tp * pp * cp)
    edp = world // (pp * ep)
    layout = Layout(world=world, tp=tp, pp=pp, cp=cp, ep=ep, etp=1, dp=dp, expert_dp=edp,
                    sequences_per_rank=1, micro_batch_size=1, micro_batches=1)
    dense = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
    expert = RankGenerator(tp=1, ep=ep, dp=edp, pp=pp, cp=1, order="tp-cp-ep-dp-pp")
    checks = [(dense, "tp", "tp"), (dense, "dp", "dp"), (dense, "cp", "cp"),
              (dense, "pp", "pp"), (expert, "ep", "ep"), (expert, "dp", "edp")]
    for gen, token, key in checks:
        for group in gen.get_ranks(token):
            coords = [layout.coordinates(r) for r in group]
            assert [c[key] for c in coords] == list(range(len(group))), (token, group)


def test_a_launch_refuses_what_its_verb_refuses_before_starting(monkeypatch):
    """--dry-run plans a layout the verb refuses (with a note); a launch stops before torchrun."""
    import vp2o.launch as launch_module

    started = []
    monkeypatch.setattr(launch_module.subprocess, "call", lambda *a, **k: started.append(a))
    args = parse_args(["launch", str(CONFIGS / "small_1node_vp2o.yaml"), "--nodes", "1",
                              "--gpus-per-node", "4", "parallel.tensor_parallel=2",
                              "parallel.sequence_parallel=true"])
    with pytest.raises(ConfigError, match="parallel.tensor_parallel = 2: expected 1 for vp2o"):
        args.func(args)
    assert started == []


def test_sft_batch_that_does_not_split_over_data_parallel_ranks_is_named_before_starting(
        monkeypatch, tmp_path):
    """sft's one rule that needs the world (the batch over DP ranks): a note in --dry-run, a
    refusal before torchrun in a launch, and the same refusal from `vp2o sft` itself."""
    import vp2o.launch as launch_module
    from vp2o.sft import sft

    config = str(CONFIGS / "small_1node_vp2o.yaml")
    out = _dry_run("--dry-run", config, "--verb", "sft", "--nodes", "1", "--gpus-per-node", "4",
                   "sft.batch_size=6")
    message = "sft.batch_size = 6: expected a multiple of the data-parallel size (4)"
    assert out.splitlines()[-1] == f"note: vp2o sft refuses this config when it starts: {message}"
    assert "refuses" not in _dry_run("--dry-run", config, "--verb", "sft", "--nodes", "1",
                                     "--gpus-per-node", "4", "sft.batch_size=8")

    started = []
    monkeypatch.setattr(launch_module.subprocess, "call", lambda *a, **k: started.append(a))
    args = parse_args(["launch", config, "--verb", "sft", "--nodes", "1",
                              "--gpus-per-node", "4", "sft.batch_size=6"])
    with pytest.raises(ConfigError, match=re.escape(message)):
        args.func(args)
    assert started == []

    monkeypatch.setenv("WORLD_SIZE", "4")  # what torchrun gives each of the 4 ranks
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    cfg = load_config(config, ["sft.batch_size=6", f"train.run_dir={tmp_path / 'run'}"], loop="sft")
    with pytest.raises(ConfigError, match=re.escape(message)):
        sft(cfg)
