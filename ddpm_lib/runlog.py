"""The run log: metrics.csv and TensorBoard, and the watch that stops training on a non-finite loss.

``LossWatch`` keeps each step's loss and gradient norm on the device (no GPU sync per step) until a
check; ``MetricsLog`` writes the rows on the main process.
"""

from __future__ import annotations

import csv
import io
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import write_text_atomic
from .distributed import DistInfo, all_mean


class NonFiniteLossError(FloatingPointError):
    """The loss (or gradient norm) became NaN or infinite; training stopped, no checkpoint written."""


class MetricsLog:
    """metrics.csv (step, loss, lr, grad_norm, images_per_s) and TensorBoard, on the main process.

    On resume, CSV rows after the resumed step (logged past the last checkpoint) are dropped.
    """

    FIELDS = ("step", "loss", "lr", "grad_norm", "images_per_s")

    def __init__(self, run_dir: Path, start_step: int, tensorboard: bool = True) -> None:
        self.path = run_dir / "metrics.csv"
        rows = []
        if self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start_step]
        text = io.StringIO()
        writer = csv.DictWriter(text, self.FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(self.path, text.getvalue())  # a crash here never loses the history
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                warnings.warn("tensorboard is not installed: metrics go to metrics.csv only "
                              "(pip install tensorboard)", stacklevel=2)
            else:
                purge = start_step + 1 if start_step else None  # drop events logged after the checkpoint
                self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=purge)

    def log(self, row: dict[str, float]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.FIELDS).writerow(row)
        if self.tb is not None:
            for key in self.FIELDS[1:]:
                self.tb.add_scalar(f"train/{key}", row[key], row["step"])

    def image(self, tag: str, grid: Tensor, step: int) -> None:
        if self.tb is not None:
            self.tb.add_image(tag, grid, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class LossWatch:
    """Loss and gradient norm of recent steps, kept on the device between checks (no GPU sync per step).

    ``check`` brings them to the CPU (averaged over processes, so all stop together) and raises
    ``NonFiniteLossError`` naming the first step whose loss or gradient norm is NaN or infinite;
    ``row`` turns the steps since the last row into one metrics row (means, lr, images/s), where
    time spent inside ``paused()`` (sampling, checkpointing) does not count as training time.
    """

    def __init__(self, dist_info: DistInfo, batch_size: int, start_step: int) -> None:
        self.dist, self.batch_size = dist_info, batch_size
        self.pending: list[tuple[int, Tensor, Tensor]] = []
        self.window: list[tuple[int, float, float]] = []  # checked (step, loss, grad_norm)
        self.row_step, self.row_time, self.paused_s = start_step, time.perf_counter(), 0.0
        self.last_loss: float | None = None
        self.rates: list[float] = []

    def add(self, step: int, loss: Tensor, grad_norm: Tensor) -> None:
        self.pending.append((step, loss, grad_norm))

    def check(self, note: str) -> None:
        if not self.pending:
            return
        steps = [s for s, _, _ in self.pending]
        vals = torch.stack([torch.stack([loss.float(), gn.float()]) for _, loss, gn in self.pending])
        self.pending.clear()
        vals = all_mean(vals, self.dist).cpu()
        bad = (~torch.isfinite(vals)).any(1).nonzero()
        if len(bad):
            i = int(bad[0])
            raise NonFiniteLossError(f"non-finite training loss at step {steps[i]} (loss={vals[i, 0].item()}, "
                                     f"grad_norm={vals[i, 1].item()}): training stopped; {note}")
        self.window += [(s, v[0].item(), v[1].item()) for s, v in zip(steps, vals, strict=True)]

    def row(self, step: int, lr: float) -> dict[str, float] | None:
        """One metrics row for the checked steps since the last row (call ``check`` first)."""
        if not self.window:
            return None
        now = time.perf_counter()
        seconds = max(now - self.row_time - self.paused_s, 1e-9)
        ips = (step - self.row_step) * self.batch_size / seconds
        loss = sum(v[1] for v in self.window) / len(self.window)
        grad_norm = sum(v[2] for v in self.window) / len(self.window)
        self.window.clear()
        self.row_step, self.row_time, self.paused_s = step, now, 0.0
        self.last_loss = loss
        self.rates.append(ips)
        return {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "images_per_s": ips}

    @contextmanager
    def paused(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t0

    def mean_images_per_s(self) -> float | None:
        """Throughput over the rows after the first (which includes start-up and compilation)."""
        rates = self.rates[1:] or self.rates
        return sum(rates) / len(rates) if rates else None
