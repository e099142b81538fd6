"""Mismatches stop the conversion with a message naming the tensor or field; nothing partial is
left at the destination (output is assembled in a temporary sibling and renamed when complete)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from convert_fixtures import build_hf_model, copy_dir
from safetensors.torch import load_file, save_file

from vp2o.convert import ConvertError, hf_io, hf_to_mcore, mcore_to_hf


def _nothing_at(out: Path) -> None:
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


def _edit_config(hf_dir: Path, **changes) -> None:
    path = hf_dir / "config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def _edit_tensors(hf_dir: Path, edit) -> None:
    path = hf_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _convert_fails(hf_dir: Path, out: Path, message: str) -> None:
    with pytest.raises(ConvertError, match=re.escape(message)):
        hf_to_mcore(hf_dir, out)
    _nothing_at(out)


@pytest.fixture
def qwen3_copy(hf_checkpoints, tmp_path) -> Path:
    return copy_dir(hf_checkpoints["qwen3_moe"][0], tmp_path / "hf")


def test_unknown_architecture(qwen3_copy, tmp_path):
    _edit_config(qwen3_copy, architectures=["LlamaForCausalLM"], model_type="llama")
    _convert_fails(qwen3_copy, tmp_path / "out", "unknown architecture: architectures = ['Llama")


def test_missing_tensor(qwen3_copy, tmp_path):
    name = "model.layers.2.mlp.experts.3.down_proj.weight"
    _edit_tensors(qwen3_copy, lambda t: t.pop(name))
    _convert_fails(qwen3_copy, tmp_path / "out", f"{name}: missing from the HF checkpoint")


def test_extra_tensor(qwen3_copy, tmp_path):
    name = "model.layers.0.mlp.experts.4.up_proj.weight"
    _edit_tensors(qwen3_copy, lambda t: t.update({name: t[name.replace(".4.", ".0.")].clone()}))
    _convert_fails(qwen3_copy, tmp_path / "out", f"{name}: in the HF checkpoint but not expected")


def test_shape_mismatch(qwen3_copy, tmp_path):
    _edit_config(qwen3_copy, moe_intermediate_size=8)
    _convert_fails(
        qwen3_copy,
        tmp_path / "out",
        "model.layers.0.mlp.experts.0.gate_proj.weight: shape [16, 32] in the checkpoint, "
        "the config implies [8, 32]",
    )


def test_layout_that_does_not_divide(hf_checkpoints, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=re.escape("model.num_experts = 4: expected divisible by")):
        hf_to_mcore(hf_checkpoints["qwen3_moe"][0], out, expert_parallel=3)
    _nothing_at(out)


def test_failure_while_writing_leaves_nothing(qwen3_copy, tmp_path, monkeypatch):
    real_get = hf_io.HFReader.get

    def flaky(self, name):
        if name == "model.norm.weight":
            raise OSError("disk went away")
        return real_get(self, name)

    monkeypatch.setattr(hf_io.HFReader, "get", flaky)
    out = tmp_path / "out"
    with pytest.raises(Exception, match="disk went away"):
        hf_to_mcore(qwen3_copy, out)
    _nothing_at(out)


def test_existing_output_is_refused(hf_checkpoints, converted, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConvertError, match="already exists"):
        hf_to_mcore(hf_checkpoints["mixtral"][0], out)
    with pytest.raises(ConvertError, match="already exists"):
        mcore_to_hf(converted("mixtral"), out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_pytorch_bin_only_is_refused(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["MixtralForCausalLM"]}))
    (hf / "pytorch_model.bin").write_bytes(b"")
    _convert_fails(hf, tmp_path / "out", "no *.safetensors files (found pytorch_model.bin")


def test_export_checkpoint_config_mismatch(converted, tmp_path):
    mcore = copy_dir(converted("qwen3_moe"), tmp_path / "mcore")
    (mcore / "hf_config.json").unlink()
    path = mcore / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["model"]["num_experts"] = 8
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    with pytest.raises(ConvertError, match=r"decoder\.layers\.0\.mlp\..*: checkpoint shape \[4,"):
        mcore_to_hf(mcore, out)
    _nothing_at(out)


def test_export_hf_config_disagrees_with_config_yaml(converted, tmp_path):
    mcore = copy_dir(converted("qwen3_moe"), tmp_path / "mcore")
    path = mcore / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["model"]["moe_router_pre_softmax"] = True
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    with pytest.raises(ConvertError, match="model.moe_router_pre_softmax = True in config.yaml"):
        mcore_to_hf(mcore, out)
    _nothing_at(out)


def test_export_needs_a_vp2o_checkpoint_dir(tmp_path):
    with pytest.raises(ConvertError, match="no config.yaml .* pass the model config"):
        mcore_to_hf(tmp_path, tmp_path / "out")


def test_olmoe_refuses_tensor_parallel(tmp_path):
    """OLMoE's full-width q/k norm spans all heads; a tensor-parallel rank holds only some."""
    from vp2o.config import ConfigError

    build_hf_model("olmoe").save_pretrained(tmp_path / "hf")
    out = tmp_path / "out"
    message = "parallel.tensor_parallel = 2: expected 1 with model.qk_layernorm_scope=full"
    with pytest.raises(ConfigError, match=re.escape(message)):
        hf_to_mcore(tmp_path / "hf", out, tensor_parallel=2)
    _nothing_at(out)


def test_vocab_padding_must_not_depend_on_the_layout(tmp_path):
    build_hf_model("qwen2_moe", vocab_size=97).save_pretrained(tmp_path / "hf")
    out = tmp_path / "out"
    with pytest.raises(ConvertError, match=r"model.vocab_size = 97: with tensor_parallel = 2"):
        hf_to_mcore(tmp_path / "hf", out, tensor_parallel=2)
    _nothing_at(out)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "config.json").write_text('{"architectures": [\n'),
         "config.json:2: not valid JSON (Expecting value)"),
        (lambda d: (d / "config.json").write_text("[1, 2]"),
         "config.json: expected a JSON object, got list"),
        (lambda d: _edit_config(d, num_hidden_layers="3"), "config.json: "),
        (lambda d: (d / "model.safetensors.index.json").write_text('{"metadata": {}}'),
         "model.safetensors.index.json: missing field 'weight_map'"),
    ],
    ids=["malformed-config", "config-not-an-object", "config-field-type", "index-without-map"],
)
def test_malformed_json_inputs_name_the_file(qwen3_copy, tmp_path, damage, message):
    """Malformed JSON beside the tensors used to end in a bare JSONDecodeError, KeyError or
    AttributeError (or a huggingface_hub validation error) without the file."""
    damage(qwen3_copy)
    _convert_fails(qwen3_copy, tmp_path / "out", f"{qwen3_copy}/{message}")


def test_a_malformed_safetensors_header_entry_names_the_tensor(qwen3_copy, tmp_path):
    path = qwen3_copy / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    del header[name]["dtype"]
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n
    text = text.ljust(n)  # same length: the offsets stay valid
    path.write_bytes(data[:8] + text + data[8 + n :])
    _convert_fails(qwen3_copy, tmp_path / "out",
                   f"{path}: tensor {name!r}: malformed safetensors header entry")


def test_an_export_with_a_provenance_file_without_family(converted, tmp_path):
    mcore = copy_dir(converted("qwen3_moe"), tmp_path / "mcore")
    (mcore / "convert.json").write_text("{}")
    out = tmp_path / "out"
    with pytest.raises(ConvertError, match=re.escape(f"{mcore}/convert.json: missing field "
                                                     "'family'")):
        mcore_to_hf(mcore, out)
    _nothing_at(out)
