"""Training metrics: a JSONL log (TensorBoard too when installed), MFU's peak, the loss-curve PNG."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from gptkern._files import write_atomic


class MetricsLog:
    """Appends one JSON object per call to ``path`` (only where ``enabled``: rank 0)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        self.tensorboard = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(self.path.parent / "tensorboard"))
            except ImportError:  # tensorboard is optional
                pass

    def log(self, step: int, **values: Optional[float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **{k: v for k, v in values.items() if v is not None}}
        # NaN and inf as null: strict JSON has no NaN (json.dumps would write a bare NaN)
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if self.tensorboard is not None:
            for key, value in record.items():
                if key not in ("step", "time") and value is not None:
                    self.tensorboard.add_scalar(key, value, step)

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps after ``step`` (a resume repeats them), atomically."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [json.dumps(r) for r in read_metrics(self.path) if r.get("step", 0) <= step]
        write_atomic(str(self.path), "".join(line + "\n" for line in kept))

    def note(self, message: str) -> None:
        if self.enabled:
            print(f"gptkern train: {message}", file=sys.stderr)


def peak_flops(device: torch.device, peak_tflops: Optional[float], table: dict[str, float]) -> Optional[float]:
    """FLOP/s of the device for MFU: ``--peak-tflops``, else a known GPU's dense bf16 peak, else None."""
    if peak_tflops:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in table.items() if key in name), None)


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a crash
            continue
    return records


def plot_losses(metrics_path: Path, png_path: Path) -> Optional[Path]:
    """Training and validation loss against step, as a PNG (None without matplotlib or data)."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if not train:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), marker="o", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    tmp = png_path.with_name(png_path.name + f".tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
