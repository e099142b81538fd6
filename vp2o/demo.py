"""The embedded CPU demo: ``make demo`` / ``vp2o demo``.

1. generate the built-in arithmetic task (held-out prompts disjoint from training) and train its
   sentencepiece tokenizer;
2. supervised warm start of the tiny MoE (4 layers, d=128, 8 experts, top-2) to a partial
   held-out accuracy;
3. GRPO and VP2O from that same checkpoint, same seed, same budget (rollout batches);
4. ``runs/demo/report.md`` with the held-out accuracy table, routing diagnostics and plots.

Every phase is a normal vp2o job (the same code as ``vp2o sft`` / ``vp2o train``), run one after
the other in this process. The settings are those of ``examples/vp2o/configs/demo_sft.yaml``,
``demo_grpo.yaml`` and ``demo_vp2o.yaml`` (both RL files include ``shared/demo_rl.yaml``): the one
place they are written, so ``vp2o sft/train --config`` on those files runs the same phases. Only
the folders move with ``root``: the files name ``runs/demo/...``.
"""

from __future__ import annotations

import time
from pathlib import Path

from vp2o.config import Config, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "vp2o" / "configs"
"""The demo's config files (in a source checkout: ``make demo`` installs vp2o editable)."""
ROOT = Path("runs/demo")
"""The folder the config files name; ``root`` replaces it."""
_FOLDERS = ("train.run_dir", "data.tokenizer_path", "train.init_checkpoint")


def demo_config(phase: str, root: Path = ROOT, extra: list[str] | None = None) -> Config:
    """The config of one demo phase (``sft``, ``grpo`` or ``vp2o``): ``demo_<phase>.yaml`` with
    its folders (run folder; for RL the SFT phase's tokenizer and checkpoint) moved from
    ``runs/demo`` to ``root``, then the ``extra`` overrides."""
    path = CONFIGS / f"demo_{phase}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: the demo's settings are missing; vp2o demo runs from a source checkout"
        )
    cfg = load_config(path)
    moved = []
    for key in _FOLDERS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is not None:
            try:
                moved.append(f"{key}={Path(root) / Path(value).relative_to(ROOT)}")
            except ValueError:
                raise ValueError(f"{path}: {key} = {value!r} is not under {ROOT}") from None
    return load_config(path, [*moved, *(extra or [])])


def run_demo(root: Path = ROOT, extra: list[str] | None = None, log=print) -> Path:
    """Run all phases; returns the report path."""
    from vp2o.report import write_report
    from vp2o.sft import sft
    from vp2o.train import train

    t0 = time.perf_counter()
    results = {}
    for phase in ("sft", "grpo", "vp2o"):
        t = time.perf_counter()
        cfg = demo_config(phase, root, extra)
        log(f"== {phase}: {cfg.train.run_dir}")
        result = sft(cfg) if phase == "sft" else train(cfg)
        results[phase] = result
        log(f"== {phase}: held-out accuracy {result['held_out_accuracy']:.3f} "
            f"({time.perf_counter() - t:.0f}s)")
    report = write_report(root, {p: root / p for p in ("sft", "grpo", "vp2o")})
    log(f"== report: {report} (total {time.perf_counter() - t0:.0f}s)")
    for phase, result in results.items():
        log(f"{phase:>5}: held-out accuracy {result['held_out_accuracy']:.3f}")
    return report
