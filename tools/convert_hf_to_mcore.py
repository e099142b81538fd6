"""Convert a Hugging Face MoE checkpoint (Qwen3-MoE, Qwen2-MoE, Mixtral) to megatron-core.

    python tools/convert_hf_to_mcore.py --hf /models/Qwen3-30B-A3B --out /ckpt/qwen3-30b-a3b --ep 8

Same as ``vp2o convert hf-to-mcore``. Writes a megatron-core dist checkpoint (loadable under any
TP/EP/PP layout) with ``config.yaml`` beside it; streams one tensor at a time; nothing is left at
``--out`` on error. Options: ``--tp N --ep N --pp N`` (layout recorded in config.yaml, checked to
divide the model), ``--dtype fp32|bf16|fp16`` (default: the checkpoint's). See docs/convert.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a source checkout

from vp2o.convert.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["hf-to-mcore", *sys.argv[1:]]))
