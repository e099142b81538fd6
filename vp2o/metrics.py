"""Per-step metrics: one JSON line per step, wandb, and a compact console line.

`MetricsLogger.log(step, metrics)` is the end of every training step (method §12). It

1. converts tensor values to Python numbers: 0-d tensors to `float` (`int` for integer and bool
   dtypes), n-d tensors to nested lists. **This is the one host-device sync of the logging path:**
   all tensors of a call are flattened and concatenated per device and copied to the host with a
   single `.cpu()` each, so callers should hand over tensors (not call `.item()` themselves);
2. appends `{"step": step, **metrics}` as one line to `run_dir/metrics.jsonl` and flushes it;
3. logs scalars to wandb (n-d values as `wandb.Histogram` of their finite entries);
4. prints a console line with a fixed selection of keys (`CONSOLE_KEYS`) every `console_every`
   steps.

JSON has no NaN or infinity: a non-finite value (also inside a matrix) is written as `null` in
the JSONL file; wandb receives it unchanged. `read_metrics` returns `None` for it, and
`vp2o.report` plots it as a gap.

Only the main rank writes (`is_main=False` makes every method a no-op and never syncs). wandb is
optional at run time: if `wandb.init` or `wandb.log` fails (say `online` without a network), a
warning is issued and the logger continues with wandb disabled; the JSONL file is the record.

Resuming: the JSONL file is opened in append mode. A run resumed from a checkpoint at step `s`
passes `resume_step=s`: every line with `step >= s` is dropped (the replayed steps are not
duplicated) and the wandb run whose id is kept in `run_dir/wandb_id` is continued
(`resume="allow"`). `resume_step=0` is a run that starts at step 0: every line is dropped and a new
wandb run starts, as it does without `resume_step` (then `metrics.jsonl` is left as it is). The
decision is the caller's, not read from `metrics.jsonl`: a checkpoint can be newer than the last
metrics line (it is written before its step's line), and an old run directory's lines are not
the history of a new run. wandb itself ignores steps at or below the last step it already has.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import string
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TextIO

from vp2o.files import write_text_atomic

__all__ = ["CONSOLE_KEYS", "METRICS_FILE", "MetricsLogger", "format_console", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_id"

CONSOLE_KEYS: tuple[tuple[str, str], ...] = (
    ("reward/mean", "reward"),
    ("accuracy", "acc"),
    ("loss/policy", "loss"),
    ("loss/sft", "loss"),
    ("kl/k3", "kl"),
    ("clip/low_frac", "clip_lo"),
    ("clip/high_frac", "clip_hi"),
    ("trust/anchor_distance", "D"),
    ("trust/accepted", "accepted"),
    ("behavior/ess", "ess"),
    ("perf/step_s", "s/step"),
)
"""(metric key, console label) printed by the console line, in this order, when present."""

WandbMode = Literal["offline", "online", "disabled"]


# --------------------------------------------------------------------------------------------
# value conversion
# --------------------------------------------------------------------------------------------


class _Slot:
    """Placeholder for a tensor while the tensors of one `log` call are copied together."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


def _is_tensor(value: Any) -> bool:
    torch = sys.modules.get("torch")  # no tensors can exist unless torch was imported
    return torch is not None and isinstance(value, torch.Tensor)


def _collect(value: Any, tensors: list[Any]) -> Any:
    """Replace every tensor in `value` (scalars, lists, tuples) by a `_Slot`; numpy to Python."""
    if _is_tensor(value):
        tensors.append(value)
        return _Slot(len(tensors) - 1)
    if isinstance(value, list | tuple):
        return [_collect(v, tensors) for v in value]
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    return value


def _tensors_to_python(tensors: list[Any]) -> list[Any]:
    """Host copies of `tensors`: one `.cpu()` per device (the logging path's only sync)."""
    import torch

    out: list[Any] = [None] * len(tensors)
    by_device: dict[Any, list[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for device, indices in by_device.items():
        dtype = torch.float32 if device.type == "mps" else torch.float64
        flat = [tensors[i].detach().reshape(-1).to(dtype) for i in indices]
        host = torch.cat(flat).cpu()  # host-device sync: the one copy of this log call
        offset = 0
        for i, f in zip(indices, flat, strict=True):
            t = tensors[i]
            part = host[offset : offset + f.numel()].reshape(t.shape)
            offset += f.numel()
            if t.dtype.is_floating_point and t.element_size() <= 4:
                out[i] = _short_float32(part)
            elif t.dtype.is_floating_point:
                out[i] = part.tolist()
            else:  # integer and bool tensors stay integers (exact below 2**53)
                out[i] = part.to(torch.int64).tolist()
    return out


def _short_float32(part: Any) -> Any:
    """Float32 (or narrower) values as the shortest decimals that round-trip in float32: a
    logged `tensor(0.3)` reads 0.3 in the JSONL file, not 0.30000001192092896."""
    import numpy as np

    arr = part.numpy()  # float64 on the host, holding float32-exact values
    arr32 = arr.astype(np.float32).reshape(-1)
    short = np.array([float(str(x)) for x in arr32], dtype=np.float64)
    return short.reshape(arr.shape).tolist()


def _fill(value: Any, host: list[Any]) -> Any:
    if isinstance(value, _Slot):
        return host[value.index]
    if isinstance(value, list):
        return [_fill(v, host) for v in value]
    return value


def _json_safe(value: Any) -> Any:
    """NaN and ±inf -> None (JSON has no NaN), recursively through lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts become `/`-joined keys: {"pass_at_k": {"1": x}} -> {"pass_at_k/1": x}."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"metric keys must be strings, got {key!r}")
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat


def to_python(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics with tensors and numpy values converted to Python numbers and nested lists.

    0-d tensors become `float` (`int` for integer/bool dtypes), n-d tensors nested lists. All
    tensors are copied to the host together (one sync per device). NaN stays NaN here.
    """
    tensors: list[Any] = []
    collected = {k: _collect(v, tensors) for k, v in _flatten(metrics).items()}
    if not tensors:
        return collected
    host = _tensors_to_python(tensors)
    return {k: _fill(v, host) for k, v in collected.items()}


# --------------------------------------------------------------------------------------------
# console
# --------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if not isinstance(value, float):
        return "?"
    if not math.isfinite(value):
        return str(value)
    if value == 0.0:
        return "0"
    if 1e-3 <= abs(value) < 1e4:
        return f"{value:.4g}"
    return f"{value:.2e}"


def format_console(step: int, metrics: Mapping[str, Any]) -> str:
    """`step 12 | reward 0.5312 | acc 0.5 | ... | s/step 1.234`: the keys of `CONSOLE_KEYS`
    that `metrics` holds as scalars, in that order."""
    parts = [f"step {step}"]
    for key, label in CONSOLE_KEYS:
        value = metrics.get(key)
        if isinstance(value, int | float):
            parts.append(f"{label} {_fmt(value)}")
    return " | ".join(parts)


# --------------------------------------------------------------------------------------------
# the logger
# --------------------------------------------------------------------------------------------


class MetricsLogger:
    """Writes each step's metrics to `run_dir/metrics.jsonl`, wandb and the console.

    Args:
        run_dir: the run's output directory (created if missing).
        config: plain nested dict of the run's config, stored in the wandb run.
        run_name: wandb run name.
        wandb_mode: `offline` (default; `run_dir/wandb/offline-run-*`, upload later with
            `wandb sync`), `online`, or `disabled` (wandb is not imported).
        wandb_project: wandb project.
        is_main: only the main rank (rank 0) writes; on other ranks every method is a no-op.
        console_every: print the console line every this many steps (0: never).
        resume_step: the step this run continues at. `s > 0`: a run resumed from a checkpoint at
            step `s`: lines with `step >= s` are dropped and the wandb run of `run_dir/wandb_id`
            is continued (a new one when there is none). `0`: a run starting at step 0: every
            line is dropped and a new wandb run starts. None (default): a new wandb run, and
            `metrics.jsonl` is left as it is.
        stream: where console lines go (default `sys.stdout`).
    """

    def __init__(
        self,
        run_dir: Path,
        config: dict,
        run_name: str,
        wandb_mode: WandbMode = "offline",
        wandb_project: str = "vp2o",
        is_main: bool = True,
        console_every: int = 1,
        *,
        resume_step: int | None = None,
        stream: TextIO | None = None,
    ) -> None:
        if wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(
                f"wandb_mode must be 'offline', 'online' or 'disabled', got {wandb_mode!r}"
            )
        if console_every < 0:
            raise ValueError(f"console_every must be >= 0, got {console_every}")
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.is_main = is_main
        self.console_every = console_every
        self.wandb_mode: WandbMode = wandb_mode
        self._stream = stream
        self._file: TextIO | None = None
        self._wandb_run: Any = None
        self._closed = False
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self.truncate_after(resume_step)
        if wandb_mode != "disabled":
            self._init_wandb(config, run_name, wandb_project, resumed=bool(resume_step))

    # ---------------------------------------------------------------------------- wandb
    def _init_wandb(self, config: dict, run_name: str, project: str, *, resumed: bool) -> None:
        try:
            import wandb

            # A resumed run continues the stored wandb run; any other run gets a new one (and
            # stores its id, before wandb.init, for the run that resumes it).
            id_file = self.run_dir / WANDB_ID_FILE
            run_id = id_file.read_text().strip() if resumed and id_file.is_file() else ""
            if not run_id:
                run_id = _new_run_id()
                write_text_atomic(id_file, run_id + "\n")
            self._wandb_run = wandb.init(
                mode=self.wandb_mode,
                dir=str(self.run_dir),
                project=project,
                name=run_name,
                id=run_id,
                config=config,
                resume="allow",
            )
        except Exception as e:  # any wandb failure must not stop training
            self._disable_wandb(f"wandb.init failed ({type(e).__name__}: {e})")

    def _disable_wandb(self, why: str) -> None:
        warnings.warn(
            f"{why}; continuing with wandb disabled (metrics still go to {self.path})",
            RuntimeWarning,
            stacklevel=4,  # the caller of MetricsLogger(...) or .log(...)
        )
        self.wandb_mode = "disabled"
        run, self._wandb_run = self._wandb_run, None
        if run is not None:
            try:
                run.finish()
            except Exception:
                pass

    def _log_wandb(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self._wandb_run is None:
            return
        try:
            import wandb

            data: dict[str, Any] = {}
            for key, value in metrics.items():
                if isinstance(value, bool):
                    data[key] = int(value)
                elif isinstance(value, int | float):
                    data[key] = value
                elif isinstance(value, list):
                    finite = [v for v in _flat_numbers(value) if math.isfinite(v)]
                    if finite:
                        data[key] = wandb.Histogram(finite)
            self._wandb_run.log(data, step=step)
        except Exception as e:
            self._disable_wandb(f"wandb.log failed ({type(e).__name__}: {e})")

    # ---------------------------------------------------------------------------- JSONL
    def _open(self) -> TextIO:
        if self._file is None:
            _drop_partial_tail(self.path)
            self._file = self.path.open("a", encoding="utf-8")
        return self._file

    def truncate_after(self, step: int) -> int:
        """Drop every line of `metrics.jsonl` with `step >= step`, and a truncated last line.
        Returns the number of lines kept. It does not change the wandb run: a resumed run passes
        `resume_step` to the constructor instead."""
        if not self.is_main:
            return 0
        if self._file is not None:
            self._file.close()
            self._file = None
        if not self.path.exists():
            return 0
        kept = [r for r in read_metrics(self.path) if r.get("step", -1) < step]
        write_text_atomic(self.path, "".join(_dumps(record) + "\n" for record in kept))
        return len(kept)

    # ---------------------------------------------------------------------------- public
    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Record one step. Returns the converted metrics (`{}` on non-main ranks).

        `metrics` values: Python numbers, lists, numpy values or tensors (0-d or n-d); nested
        dicts are flattened with `/`. Tensors are copied to the host here (one sync per device).
        """
        if not self.is_main:
            return {}
        if self._closed:
            raise RuntimeError("MetricsLogger.log after close()")
        if "step" in metrics:
            raise ValueError("'step' is reserved; pass it as the step argument")
        values = to_python(metrics)
        step = int(step)
        f = self._open()
        f.write(_dumps({"step": step, **values}) + "\n")
        f.flush()
        self._log_wandb(step, values)
        if self.console_every and step % self.console_every == 0:
            print(format_console(step, values), file=self._stream or sys.stdout, flush=True)
        return values

    def close(self) -> None:
        """Close the JSONL file and finish the wandb run. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._file is not None:
            self._file.close()
            self._file = None
        run, self._wandb_run = self._wandb_run, None
        if run is not None:
            try:
                run.finish()
            except Exception as e:
                warnings.warn(f"wandb finish failed ({type(e).__name__}: {e})", stacklevel=2)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------


def _new_run_id() -> str:
    """A wandb-style run id: 8 lowercase letters and digits."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _flat_numbers(value: Any) -> list[float]:
    if isinstance(value, list):
        return [x for v in value for x in _flat_numbers(v)]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return [float(value)]
    return []


def _dumps(record: Mapping[str, Any]) -> str:
    return json.dumps(
        {k: _json_safe(v) for k, v in record.items()}, allow_nan=False, separators=(",", ":")
    )


def _drop_partial_tail(path: Path) -> None:
    """Cut a last line without its newline (a crash mid-write) so appends start on a new line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        data = path.read_bytes()
        f.truncate(data.rfind(b"\n") + 1)


_BLANK = re.compile(r"^\s*$")


def read_metrics(path: Path | str) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl` (or of a run directory holding one), in file order.

    `null` values come back as `None`. A last line that does not parse (a run killed mid-write)
    is dropped; a bad line anywhere else raises `ValueError`.
    """
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    lines = path.read_text(encoding="utf-8").split("\n")
    while lines and _BLANK.match(lines[-1]):
        lines.pop()
    records: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if _BLANK.match(line):
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            if i == len(lines) - 1:
                break  # truncated last line
            raise ValueError(f"{path}:{i + 1}: bad metrics line ({e})") from e
        records.append(record)
    return records
