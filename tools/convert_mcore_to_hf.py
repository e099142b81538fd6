"""Convert a vp2o megatron-core checkpoint back to Hugging Face safetensors.

    python tools/convert_mcore_to_hf.py --mcore runs/x/checkpoints/step_00000100 \
        --config /ckpt/qwen3-30b-a3b --out /models/qwen3-30b-a3b-rl

Same as ``vp2o convert mcore-to-hf``. Reads a dist checkpoint saved under any layout: a directory
``hf-to-mcore`` wrote, or a training checkpoint with ``--config`` naming the directory
``hf-to-mcore`` wrote (model config, HF config and tokenizer come from there). Writes
``model-0000i-of-0000n.safetensors`` shards (``--max-shard-size``, default 5GB) with
``model.safetensors.index.json``, ``config.json`` and the tokenizer files; streams one tensor at a
time; nothing is left at ``--out`` on error. See docs/convert.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from vp2o.convert.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["mcore-to-hf", *sys.argv[1:]]))
