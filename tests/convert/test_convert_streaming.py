"""Streaming: the megatron side is written one parameter at a time from a meta-device model and
read back by parts; the HF side is written tensor by tensor into pre-planned shards."""

from __future__ import annotations

import json
import weakref
import zlib

import pytest
import torch
from safetensors.torch import load_file

from vp2o.config import load_config
from vp2o.convert import ConvertError, hf_io, mcore_io


def _value(name: str, shape, dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(shape, generator=gen).to(dtype)


def test_dist_checkpoint_written_one_parameter_at_a_time(tmp_path):
    cfg = load_config(
        None,
        [
            "model.num_layers=3",
            "model.moe_layer_freq=[1,0,1]",
            "model.moe_shared_expert_intermediate_size=32",
            "model.moe_shared_expert_gate=true",
            "model.add_qkv_bias=true",
            "model.qk_layernorm=true",
        ],
    )
    live: set[int] = set()
    produced: dict[str, int] = {}
    peak = 0
    with mcore_io.single_process():
        model = mcore_io.build_meta_model(cfg)
        assert all(p.is_meta for p in model.parameters())
        shapes, dtypes = mcore_io.param_shapes(model), mcore_io.param_dtypes(model)

        def produce(name: str) -> torch.Tensor:
            nonlocal peak
            t = _value(name, shapes[name], dtypes[name])
            produced[name] = produced.get(name, 0) + 1
            live.add(id(t))
            weakref.finalize(t, live.discard, id(t))
            peak = max(peak, len(live))
            return t

        mcore_io.save_streaming(model, produce, tmp_path, file_bytes=200_000)
        # Each parameter is built exactly once, and at most the previous one is still alive.
        assert produced == {name: 1 for name in shapes}
        assert peak <= 2
        assert len(list(tmp_path.glob("__0_*.distcp"))) > 1  # rolled over at file_bytes
        # Read back by parts (a few parameters per call): identical values.
        pieces = mcore_io.checkpoint_pieces(model)
        names = sorted(shapes)
        for i in range(0, len(names), 7):
            got = mcore_io.load_params(pieces, shapes, dtypes, names[i : i + 7], tmp_path)
            for name, t in got.items():
                assert torch.equal(t, _value(name, shapes[name], dtypes[name])), name
        mcore_io.check_checkpoint(model, tmp_path)


def test_safetensors_writer_streams_into_planned_shards(tmp_path):
    tensors = {
        f"t{i}": torch.randn(10 + i, 3).to(torch.bfloat16 if i % 2 else torch.float32)
        for i in range(5)
    }
    plan = [hf_io.PlannedTensor(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = hf_io.SafetensorsShardWriter(tmp_path, plan, max_shard_bytes=200)
    for name, t in tensors.items():
        writer.write(name, t)
    writer.finish()
    index = json.loads((tmp_path / hf_io.INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 4  # t0 + t1 share the first 200-byte shard; the others are too big
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    loaded = {}
    for f in files:
        loaded.update(load_file(tmp_path / f))
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())
    with hf_io.HFReader(tmp_path) as reader:
        assert reader.names() == set(tensors)
        assert reader.shape("t3") == (13, 3) and reader.dtype("t3") == torch.bfloat16


def test_safetensors_writer_checks_the_plan(tmp_path):
    plan = [
        hf_io.PlannedTensor("a", (2,), torch.float32),
        hf_io.PlannedTensor("b", (2,), torch.float32),
    ]
    writer = hf_io.SafetensorsShardWriter(tmp_path, plan, max_shard_bytes=10**6)
    with pytest.raises(ConvertError, match="b: written out of order; expected a"):
        writer.write("b", torch.zeros(2))
    with pytest.raises(ConvertError, match=r"a: shape \[3\]"):
        writer.write("a", torch.zeros(3))
    writer.write("a", torch.zeros(2))
    with pytest.raises(ConvertError, match="b: planned but never written"):
        writer.finish()
    writer.abort()
