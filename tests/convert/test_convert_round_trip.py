"""HF -> megatron-core: same logits; megatron-core -> HF: bit-identical tensors, same config.

Per family: a tiny random HF model (transformers, no download) is saved, converted, loaded into
our megatron ``GPTModel`` (built by ``vp2o.mcore.model.build_model`` from the written
``config.yaml``) and both forwards run on the same tokens on CPU in float32.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from convert_fixtures import SUPPORTED, build_hf_model, copy_dir, hf_logits
from safetensors import safe_open

from vp2o.config import load_config
from vp2o.convert import ConvertError, hf_to_mcore, mcore_to_hf


def _tensors(hf_dir) -> dict[str, torch.Tensor]:
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    out = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(hf_dir / file), framework="pt") as f:
            for name in f.keys():
                assert index["weight_map"][name] == file
                out[name] = f.get_tensor(name)
    return out


def _source_tensors(hf_dir) -> dict[str, torch.Tensor]:
    with safe_open(str(hf_dir / "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


@pytest.mark.parametrize("family", SUPPORTED)
def test_hf_to_mcore_logits_match(family, hf_checkpoints, converted, megatron_logits):
    _, want = hf_checkpoints[family]
    mcore_dir = converted(family)
    cfg = load_config(mcore_dir / "config.yaml")
    assert cfg.parallel.expert_parallel == 2 and cfg.model.params_dtype == "fp32"
    got = megatron_logits(mcore_dir)
    assert want.std() > 0.1, "logits too flat for a meaningful comparison"
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("family", SUPPORTED)
def test_round_trip_is_bit_identical(family, hf_checkpoints, converted, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_dir, logits = hf_checkpoints[family]
    out = mcore_to_hf(converted(family), tmp_path / "hf", max_shard_bytes=20_000).out
    src, back = _source_tensors(hf_dir), _tensors(out)
    assert sorted(back) == sorted(src)
    for name, t in src.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    assert (
        len(
            set(
                json.loads((out / "model.safetensors.index.json").read_text())[
                    "weight_map"
                ].values()
            )
        )
        > 1
    )
    # config.json is written back verbatim; transformers reads the same config.
    assert json.loads((out / "config.json").read_text()) == json.loads(
        (hf_dir / "config.json").read_text()
    )
    loaded = [AutoConfig.from_pretrained(d).to_dict() for d in (out, hf_dir)]
    for d in loaded:
        d.pop("_name_or_path")
    assert loaded[0] == loaded[1]
    assert (out / "generation_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.equal(hf_logits(model), logits)


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "olmoe"])
def test_generated_hf_config_gives_same_model(family, hf_checkpoints, converted, tmp_path):
    """Without the source config.json (e.g. a checkpoint from elsewhere), config.json is generated
    from config.yaml; transformers loads it and computes the same logits."""
    from transformers import AutoModelForCausalLM

    _, logits = hf_checkpoints[family]
    mcore_dir = copy_dir(converted(family), tmp_path / "mcore")
    (mcore_dir / "hf_config.json").unlink()
    out = mcore_to_hf(mcore_dir, tmp_path / "hf").out
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.equal(hf_logits(model), logits)


def test_bf16_checkpoint_stays_bf16_and_round_trips(tmp_path):
    """bf16 in, bf16 out, bit-identical (megatron keeps the local spec's norm weights in fp32;
    bf16 -> fp32 -> bf16 is exact)."""
    model = build_hf_model("mixtral", seed=3, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    rng = torch.get_rng_state()
    mcore_dir = hf_to_mcore(tmp_path / "hf", tmp_path / "mcore").out
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream is untouched
    assert load_config(mcore_dir / "config.yaml").model.params_dtype == "bf16"
    out = mcore_to_hf(mcore_dir, tmp_path / "back").out
    src, back = _source_tensors(tmp_path / "hf"), _tensors(out)
    assert all(back[n].dtype == torch.bfloat16 and torch.equal(back[n], t) for n, t in src.items())


def test_dtype_override_casts(hf_checkpoints, tmp_path):
    """dtype=bf16 stores bf16 tensors (megatron's norm weights stay fp32), not fp32 ones with a
    bf16 label, and they export as the fp32 source rounded to bf16."""
    from torch.distributed.checkpoint import FileSystemReader

    hf_dir = hf_checkpoints["mixtral"][0]
    out = hf_to_mcore(hf_dir, tmp_path / "mcore", dtype="bf16").out
    assert load_config(out / "config.yaml").model.params_dtype == "bf16"
    stored = {name: meta.properties.dtype for name, meta in
              FileSystemReader(str(out)).read_metadata().state_dict_metadata.items()
              if getattr(meta, "properties", None) is not None}
    assert stored and all(dtype == (torch.float32 if "norm" in name else torch.bfloat16)
                          for name, dtype in stored.items()), stored
    src, back = _source_tensors(hf_dir), _tensors(mcore_to_hf(out, tmp_path / "back").out)
    assert all(src[n].dtype == torch.float32 for n in src)
    assert all(torch.equal(back[n], t.to(torch.bfloat16)) for n, t in src.items())
    with pytest.raises(ConvertError, match="dtype = 'fp8'"):
        hf_to_mcore(hf_checkpoints["mixtral"][0], tmp_path / "x", dtype="fp8")


def test_olmoe_logits_match(hf_checkpoints, tmp_path, megatron_logits):
    """OLMoE normalises q and k over the whole projection (one RMS statistic over all heads):
    converted with model.qk_layernorm_scope=full, its full-width weights, same logits."""
    from vp2o.convert.mcore_io import read_checkpoint_shapes

    hf_dir, want = hf_checkpoints["olmoe"]
    mcore_dir = hf_to_mcore(hf_dir, tmp_path / "mcore").out
    cfg = load_config(mcore_dir / "config.yaml")
    assert (cfg.model.qk_layernorm, cfg.model.qk_layernorm_scope) == (True, "full")
    shapes = read_checkpoint_shapes(mcore_dir)  # layers stacked on axis 0
    assert shapes["decoder.layers.self_attention.q_layernorm.weight"] == (2, 4 * 8)  # [L, H h]
    assert shapes["decoder.layers.self_attention.k_layernorm.weight"] == (2, 2 * 8)  # [L, G h]
    assert want.std() > 0.1, "logits too flat for a meaningful comparison"
    assert (megatron_logits(mcore_dir) - want).abs().max().item() <= 1e-4


def _weights_only(src, dst):
    """A directory with just the dist checkpoint files, as a training checkpoint has them."""
    dst.mkdir()
    for p in src.iterdir():
        if p.is_file() and (
            p.suffix == ".distcp" or p.name in (".metadata", "metadata.json", "common.pt")
        ):
            shutil.copy2(p, dst / p.name)
    return dst


def test_export_with_config_from_the_converted_dir(hf_checkpoints, converted, tmp_path):
    """A checkpoint without config.yaml (e.g. runs/x/checkpoints/step_N) exports with
    --config pointing at the directory hf-to-mcore wrote: same bytes, same config.json."""
    hf_dir, _ = hf_checkpoints["qwen2_moe"]
    ckpt = _weights_only(converted("qwen2_moe"), tmp_path / "step_00000010")
    with pytest.raises(ConvertError, match="pass the model config"):
        mcore_to_hf(ckpt, tmp_path / "x")
    out = mcore_to_hf(ckpt, tmp_path / "hf", config=converted("qwen2_moe")).out
    src, back = _source_tensors(hf_dir), _tensors(out)
    assert sorted(src) == sorted(back) and all(torch.equal(back[n], t) for n, t in src.items())
    assert (out / "config.json").read_text() == (
        converted("qwen2_moe") / "hf_config.json"
    ).read_text()


def test_export_with_config_stored_by_training(hf_checkpoints, converted, tmp_path):
    """A training checkpoint keeps its config in trainer_state.pt (extra["config"])."""
    from transformers import AutoModelForCausalLM

    from vp2o.config import to_dict

    _, logits = hf_checkpoints["qwen3_moe"]
    ckpt = _weights_only(converted("qwen3_moe"), tmp_path / "step_00000010")
    cfg = load_config(converted("qwen3_moe") / "config.yaml")
    torch.save({"scheduler": None, "extra": {"config": to_dict(cfg)}}, ckpt / "trainer_state.pt")
    with pytest.raises(ConvertError, match="--family"):
        mcore_to_hf(ckpt, tmp_path / "x")
    out = mcore_to_hf(ckpt, tmp_path / "hf", family="qwen3_moe").out
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.equal(hf_logits(model), logits)


def test_a_mixed_dtype_checkpoint_reports_what_was_rounded(tmp_path, capsys):
    """A bf16 checkpoint with one float32 router: its values are rounded to the parameters'
    bf16, and the conversion names it (no note for the tensors bf16 holds exactly)."""
    from vp2o.cli import main

    model = build_hf_model("mixtral", seed=3, dtype=torch.bfloat16)
    gate = model.model.layers[0].mlp.gate
    gate.weight.data = gate.weight.data.float() + 1e-4  # not representable in bf16
    model.model.layers[1].mlp.gate.weight.data = model.model.layers[1].mlp.gate.weight.data.float()
    model.save_pretrained(tmp_path / "hf")
    result = hf_to_mcore(tmp_path / "hf", tmp_path / "mcore")
    assert result.narrowed == (
        "model.layers.0.block_sparse_moe.gate.weight: float32 -> bfloat16",)  # its HF file name
    assert hf_to_mcore(tmp_path / "hf", tmp_path / "m2", dtype="bf16").narrowed == ()  # asked
    assert main(["convert", "hf-to-mcore", "--hf", str(tmp_path / "hf"),
                 "--out", str(tmp_path / "m3")]) == 0
    assert "note: 1 HF tensors were stored in a wider dtype" in capsys.readouterr().out
