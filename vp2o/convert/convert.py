"""HF <-> megatron-core checkpoint conversion for MoE models, streaming, all-or-nothing.

    hf_to_mcore("/models/Qwen3-30B-A3B", "/ckpt/qwen3-30b", expert_parallel=8)
    mcore_to_hf("/ckpt/qwen3-30b", "/models/qwen3-30b-rl")

The megatron directory holds a ``torch_dist`` dist checkpoint of ``{"model":
model.sharded_state_dict()}`` (loadable under any TP/EP/PP layout) and, beside it:

- ``config.yaml``: the vp2o config (``model`` section, plus the ``parallel`` layout asked for),
  loadable with ``vp2o.config.load_config``;
- ``hf_config.json``: the source ``config.json``, written back on export (its dtype set to the
  exported one);
- ``hf_extra/``: the source directory's other small files (tokenizer, generation config), copied
  back on export so the result can be served as is;
- ``convert.json``: provenance (family, source, dtype, vp2o format version).

Everything is checked before anything is written (architecture, every tensor's presence and
shape, the config's expressibility); the output is assembled in a temporary sibling directory and
renamed into place only when complete, so a failure leaves nothing at the destination.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from vp2o.config import Config, ModelConfig, ParallelConfig, from_dict, load_config, to_dict
from vp2o.convert import families as fam
from vp2o.convert import hf_io, mcore_io
from vp2o.convert.tensors import ConvertError, TensorRule, get_layout, read_json_object
from vp2o.dtypes import DTYPE_NAMES, DTYPES
from vp2o.files import atomic_directory, can_take_folder

FORMAT_VERSION = 1
CONFIG_NAME = "config.yaml"
HF_CONFIG_NAME = "hf_config.json"
HF_EXTRA_DIR = "hf_extra"
PROVENANCE_NAME = "convert.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3
_SKIP_EXTRA = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_MAX_EXTRA_BYTES = 64 * 1024**2
_IGNORED_HF = (".rotary_emb.inv_freq",)  # non-learned buffers some old checkpoints carry


@dataclass(frozen=True)
class ConvertResult:
    """What a conversion wrote."""

    out: Path
    family: str
    num_tensors: int
    """Megatron parameters (hf_to_mcore) or HF tensors (mcore_to_hf) written."""
    total_bytes: int
    largest_tensor_bytes: int
    narrowed: tuple[str, ...] = ()
    """hf_to_mcore at the checkpoint's own dtype: HF tensors whose values the megatron
    parameter's dtype rounded (e.g. a float32 router in a bfloat16 checkpoint), as
    ``name: from -> to``."""


def _check_output_free(out: str | os.PathLike) -> Path:
    """``out`` as a path, refused (naming it) when it exists and is not an empty folder: the
    conversion writes into a sibling and renames it there (``vp2o.files.atomic_directory``)."""
    if not can_take_folder(out):
        raise ConvertError(f"{out}: already exists; remove it or choose another output directory")
    return Path(out)


def _copy_extra_files(src: Path, dst: Path) -> list[str]:
    """Copy small non-weight top-level files (tokenizer, generation config, ...)."""
    copied = []
    for p in sorted(src.iterdir()):
        if (
            p.is_file()
            and not p.name.endswith(_SKIP_EXTRA)
            and p.name not in ("config.json", hf_io.INDEX_NAME)
            and p.stat().st_size <= _MAX_EXTRA_BYTES
        ):
            dst.mkdir(exist_ok=True)
            shutil.copy2(p, dst / p.name)
            copied.append(p.name)
    return copied


def _source_dtype(reader: hf_io.HFReader) -> str:
    """Parameter dtype of an HF checkpoint: its embedding's."""
    dtype = reader.dtype("model.embed_tokens.weight")
    if dtype not in DTYPE_NAMES:
        raise ConvertError(f"model.embed_tokens.weight: dtype {dtype} is not fp32, bf16 or fp16")
    return DTYPE_NAMES[dtype]


def _check_hf_tensors(
    reader: hf_io.HFReader,
    rules: list[TensorRule],
    shapes: dict[str, tuple[int, ...]],
    m: ModelConfig,
) -> None:
    """Every expected HF tensor exists with the shape the config implies; nothing else exists."""
    geo = fam.geometry(m)
    expected: dict[str, tuple[int, ...]] = {}
    for rule in rules:
        hf_shapes = get_layout(rule.layout).hf_shapes(shapes[rule.mcore], geo)
        for name, hf_shape in zip(rule.hf, hf_shapes, strict=True):
            expected[name] = tuple(hf_shape)
    have = reader.names()
    for name, shape in expected.items():
        if name not in have:
            raise ConvertError(f"{name}: missing from the HF checkpoint in {reader.dir}")
        got = reader.shape(name)
        if got != shape:
            raise ConvertError(
                f"{name}: shape {list(got)} in the checkpoint, the config implies {list(shape)}"
            )
    extra = sorted(n for n in have - set(expected) if not n.endswith(_IGNORED_HF))
    if extra == ["lm_head.weight"] and not m.untie_embeddings_and_output_weights:
        if not torch.equal(reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight")):
            raise ConvertError(
                "lm_head.weight: present and different from model.embed_tokens.weight although "
                "config.json says tie_word_embeddings = true"
            )
        extra = []
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ConvertError(
            f"{extra[0]}: in the HF checkpoint but not expected for this config{more}"
        )


def _check_rules_against_model(rules: list[TensorRule], shapes: dict[str, tuple[int, ...]]) -> None:
    names = [r.mcore for r in rules]
    missing = sorted(set(shapes) - set(names))
    unknown = sorted(set(names) - set(shapes))
    if missing or unknown:  # pragma: no cover - guards a builder change
        which = missing[0] if missing else unknown[0]
        raise ConvertError(f"{which}: the family mapping and the model builder disagree")


def _check_vocab_padding(cfg: Config) -> None:
    """The embedding is stored at the TP = 1 padded size; the recorded TP must not pad further."""
    from vp2o.mcore.model import padded_vocab_size

    here = padded_vocab_size(mcore_io.conversion_config(cfg))
    there = padded_vocab_size(cfg)
    if here != there:
        m = cfg.model
        raise ConvertError(
            f"model.vocab_size = {m.vocab_size}: with tensor_parallel = "
            f"{cfg.parallel.tensor_parallel} the embedding is padded to {there} rows, not {here}; "
            "use a tensor-parallel size that divides the vocabulary"
        )


def hf_to_mcore(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tensor_parallel: int = 1,
    expert_parallel: int = 1,
    pipeline_parallel: int = 1,
    dtype: str | None = None,
    file_bytes: int = mcore_io.CHECKPOINT_FILE_BYTES,
) -> ConvertResult:
    """Convert an HF MoE checkpoint into a megatron-core dist checkpoint plus its vp2o config.

    Args:
        hf_dir: HF directory (``config.json`` + safetensors, sharded or not).
        out_dir: destination; must not exist, or be an empty folder.
        tensor_parallel, expert_parallel, pipeline_parallel: the layout recorded in
            ``config.yaml`` (checked to divide the model). The checkpoint itself loads under any
            layout.
        dtype: parameter dtype (``fp32``/``bf16``/``fp16``); default: the checkpoint's.
        file_bytes: size of each ``.distcp`` file before rolling over.

    Raises:
        ConvertError / vp2o.config.ConfigError: naming the tensor or field; nothing is written.
    """
    hf_dir = Path(hf_dir)
    out = _check_output_free(out_dir)  # before any work; atomic_directory checks again
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise ConvertError(f"{hf_dir}: no config.json")
    raw = read_json_object(config_path)
    family = fam.family_for(raw)
    with hf_io.HFReader(hf_dir) as reader:
        params_dtype = dtype or _source_dtype(reader)
        if params_dtype not in DTYPES:
            raise ConvertError(f"dtype = {params_dtype!r}: expected one of {', '.join(DTYPES)}")
        try:
            hf_config = fam.load_hf_config(raw)
        except ConvertError as e:
            raise ConvertError(f"{config_path}: {e}") from None
        except Exception as e:  # noqa: BLE001 - transformers/huggingface_hub field checks
            raise ConvertError(f"{config_path}: {type(e).__name__}: {e}") from None
        model_cfg = family.model_config(hf_config, params_dtype=params_dtype)
        cfg = Config(
            model=model_cfg,
            parallel=ParallelConfig(
                tensor_parallel=tensor_parallel,
                expert_parallel=expert_parallel,
                pipeline_parallel=pipeline_parallel,
                sequence_parallel=tensor_parallel > 1,
            ),
        ).validate()
        _check_vocab_padding(cfg)
        rules = family.rules(model_cfg)
        geo = fam.geometry(model_cfg)
        with mcore_io.single_process():
            model = mcore_io.build_meta_model(cfg)
            shapes = mcore_io.param_shapes(model)
            dtypes = mcore_io.param_dtypes(model)
            _check_rules_against_model(rules, shapes)
            _check_hf_tensors(reader, rules, shapes, model_cfg)
            by_name = {r.mcore: r for r in rules}
            narrowed: list[str] = []

            def read(hf_name: str, to: torch.dtype) -> torch.Tensor:
                t = reader.get(hf_name)
                cast = t.to(to)
                # a --dtype the caller chose rounds on purpose: nothing to report then
                if (dtype is None and t.dtype != to and t.is_floating_point()
                        and not torch.equal(cast.to(t.dtype), t)):
                    narrowed.append(f"{hf_name}: {_dtype_name(t.dtype)} -> {_dtype_name(to)}")
                return cast

            def produce(name: str) -> torch.Tensor:
                rule = by_name[name]
                parts = [read(n, dtypes[name]) for n in rule.hf]
                t = get_layout(rule.layout).to_mcore(parts, geo, shapes[name])
                if tuple(t.shape) != shapes[name]:  # pragma: no cover - layouts are tested
                    raise ConvertError(
                        f"{name}: built {list(t.shape)}, model has {list(shapes[name])}"
                    )
                return t

            with atomic_directory(out) as tmp:
                mcore_io.save_streaming(model, produce, tmp, file_bytes=file_bytes)
                _write_mcore_side_files(tmp, cfg, raw, family, hf_dir)
    sizes = [_numel(shapes[n]) * _itemsize(dtypes[n]) for n in shapes]
    return ConvertResult(out, family.name, len(shapes), sum(sizes), max(sizes), tuple(narrowed))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _write_mcore_side_files(
    tmp: Path, cfg: Config, raw: dict, family: fam.Family, hf_dir: Path
) -> None:
    section = to_dict(cfg)
    body = {"model": section["model"], "parallel": section["parallel"]}
    (tmp / CONFIG_NAME).write_text(
        f"# vp2o config written by `vp2o convert hf-to-mcore` from {hf_dir}\n"
        + yaml.safe_dump(body, sort_keys=False)
    )
    (tmp / HF_CONFIG_NAME).write_text(json.dumps(raw, indent=2) + "\n")
    extra = _copy_extra_files(hf_dir, tmp / HF_EXTRA_DIR)
    provenance = {
        "format_version": FORMAT_VERSION,
        "family": family.name,
        "architecture": family.architecture,
        "source": str(hf_dir),
        "params_dtype": cfg.model.params_dtype,
        "hf_extra_files": extra,
        "checkpoint": "megatron-core dist_checkpointing, torch_dist: {'model': sharded_state_dict}",
    }
    (tmp / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2) + "\n")


TRAINER_STATE = "trainer_state.pt"
"""Training checkpoints (vp2o.mcore.checkpoint) keep ``extra["config"]`` in this file."""


def _export_sources(
    mcore_dir: Path, config: str | os.PathLike | None
) -> tuple[ModelConfig, Path | None]:
    """The model config to export with, and the directory holding ``hf_config.json``,
    ``convert.json`` and ``hf_extra/`` (None when there is none).

    Order: ``config`` (a vp2o YAML, or a directory written by :func:`hf_to_mcore`), else
    ``mcore_dir/config.yaml``, else the config stored in a training checkpoint's
    ``trainer_state.pt``.
    """
    if config is not None:
        config = Path(config)
        if config.is_dir():
            if not (config / CONFIG_NAME).is_file():
                raise ConvertError(f"{config}: no {CONFIG_NAME}")
            return load_config(config / CONFIG_NAME).model, config
        return load_config(config).model, None
    if (mcore_dir / CONFIG_NAME).is_file():
        return load_config(mcore_dir / CONFIG_NAME).model, mcore_dir
    if (mcore_dir / TRAINER_STATE).is_file():
        state = torch.load(mcore_dir / TRAINER_STATE, map_location="cpu", weights_only=True)
        raw = (state.get("extra") or {}).get("config") if isinstance(state, dict) else None
        if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
            cfg = from_dict(Config, {"model": raw["model"]})
            return cfg.validate().model, None
    raise ConvertError(
        f"{mcore_dir}: no {CONFIG_NAME} (written by `vp2o convert hf-to-mcore`) and no training "
        f"config in {TRAINER_STATE}; pass the model config (--config)"
    )


def _family_of(side: Path | None, family: str | None) -> tuple[fam.Family, dict | None]:
    original = None
    if side is not None and (side / HF_CONFIG_NAME).is_file():
        original = read_json_object(side / HF_CONFIG_NAME)
    if family is not None:
        return fam.get_family(family), original
    if side is not None and (side / PROVENANCE_NAME).is_file():
        name = read_json_object(side / PROVENANCE_NAME, required=("family",))["family"]
        return fam.get_family(name), original
    if original is not None:
        return fam.family_for(original), original
    raise ConvertError(
        f"no {PROVENANCE_NAME} or {HF_CONFIG_NAME} tells the model family; pass it (--family, "
        f"one of {', '.join(fam.FAMILIES.names())})"
    )


def _hf_config_for_export(
    family: fam.Family, model_cfg: ModelConfig, original: dict | None
) -> dict:
    """The source ``config.json`` if it still describes ``model_cfg``, else a generated one."""
    if original is None:
        return family.hf_config(model_cfg)
    back = family.model_config(fam.load_hf_config(original), params_dtype=model_cfg.params_dtype)
    diffs = fam.arch_differences(model_cfg, back)
    if diffs:
        field, ours, theirs = diffs[0]
        raise ConvertError(
            f"model.{field} = {ours!r} in {CONFIG_NAME} but {HF_CONFIG_NAME} implies {theirs!r}; "
            f"remove {HF_CONFIG_NAME} to generate the HF config from {CONFIG_NAME}"
        )
    out = dict(original)
    name = fam.DTYPE_NAMES[model_cfg.params_dtype]
    for key in ("torch_dtype", "dtype"):
        if key in out and out[key] != name:
            out[key] = name
    return out


def mcore_to_hf(
    mcore_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    config: str | os.PathLike | None = None,
    family: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    buffer_bytes: int | None = None,
) -> ConvertResult:
    """Convert a vp2o megatron-core dist checkpoint into an HF safetensors directory.

    Args:
        mcore_dir: a dist checkpoint saved under any layout: a directory written by
            :func:`hf_to_mcore`, or a training checkpoint (``runs/x/checkpoints/step_N``).
        out_dir: destination; must not exist, or be an empty folder.
        config: the model config when ``mcore_dir`` has no ``config.yaml``: a vp2o YAML, or the
            directory :func:`hf_to_mcore` wrote (then its ``hf_config.json`` and tokenizer files
            are used too). Default: ``mcore_dir/config.yaml``, else the config a training
            checkpoint stores.
        family: HF family (``qwen3_moe``, ...); default from ``convert.json`` / ``hf_config.json``.
        max_shard_bytes: largest safetensors shard (a bigger single tensor gets its own).
        buffer_bytes: parameters read from the checkpoint per load call; default the largest
            parameter's size (a bigger parameter is read alone).

    Raises:
        ConvertError / vp2o.config.ConfigError: naming the tensor or field; nothing is written.
    """
    mcore_dir = Path(mcore_dir)
    out = _check_output_free(out_dir)  # before any work; atomic_directory checks again
    if not mcore_dir.is_dir():
        raise ConvertError(f"{mcore_dir}: not a directory")
    model_cfg, side = _export_sources(mcore_dir, config)
    cfg = Config(model=model_cfg)
    family_obj, original = _family_of(side, family)
    hf_config = _hf_config_for_export(family_obj, model_cfg, original)
    rules = family_obj.rules(model_cfg)
    geo = fam.geometry(model_cfg)
    torch_dtype = DTYPES[model_cfg.params_dtype]
    with mcore_io.single_process():
        model = mcore_io.build_meta_model(cfg)
        shapes = mcore_io.param_shapes(model)
        dtypes = mcore_io.param_dtypes(model)
        _check_rules_against_model(rules, shapes)
        mcore_io.check_checkpoint(model, mcore_dir)
        pieces = mcore_io.checkpoint_pieces(model)
        plan = [
            hf_io.PlannedTensor(name, tuple(s), torch_dtype)
            for r in rules
            for name, s in zip(
                r.hf, get_layout(r.layout).hf_shapes(shapes[r.mcore], geo), strict=True
            )
        ]
        sizes = {r.mcore: _numel(shapes[r.mcore]) * _itemsize(dtypes[r.mcore]) for r in rules}
        budget = buffer_bytes or max(sizes.values())
        batches: list[list[TensorRule]] = [[]]
        used = 0
        for r in rules:
            if batches[-1] and used + sizes[r.mcore] > budget:
                batches.append([])
                used = 0
            batches[-1].append(r)
            used += sizes[r.mcore]
        with atomic_directory(out) as tmp:
            writer = hf_io.SafetensorsShardWriter(tmp, plan, max_shard_bytes)
            try:
                for batch in batches:
                    params = mcore_io.load_params(
                        pieces, shapes, dtypes, [r.mcore for r in batch], mcore_dir
                    )
                    for r in batch:
                        parts = get_layout(r.layout).to_hf(params.pop(r.mcore), geo)
                        for name, t in zip(r.hf, parts, strict=True):
                            writer.write(name, t.to(torch_dtype))
                        del parts
                writer.finish()
            except BaseException:
                writer.abort()
                raise
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
            extra = side / HF_EXTRA_DIR if side is not None else None
            if extra is not None and extra.is_dir():
                for p in sorted(extra.iterdir()):
                    if p.is_file():
                        shutil.copy2(p, tmp / p.name)
    largest = max(p.nbytes for p in plan)
    return ConvertResult(out, family_obj.name, len(plan), sum(p.nbytes for p in plan), largest)
