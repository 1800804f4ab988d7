"""A fine-tuning run: its folder, data, loop, checkpoints, resume and report.

The folder (default ``RUN/finetune``; one holding anything else is refused) holds ``finetune.json``
(the settings and the pretrained checkpoint, written once every check has passed; a resume compares
them and refuses another checkpoint or a change other than ``RESUME_MAY_CHANGE``),
``checkpoints/`` (atomic ``ckpt-<step>.pt`` and ``latest.pt``, the newest ``keep_checkpoints``
kept, loaded weights-only), ``metrics.csv`` and the report (``report.json``, ``report.md``). One
process at a time uses it (``run_folder.RunLock``). A run is a pure function of its settings: the
batch order and crops follow from (seed, step) as in pretraining (``data.loader.StepBatchSampler``,
``PretrainDataset``), and a checkpoint holds every RNG state (drop path draws from torch's), so a
run stopped and resumed repeats the uninterrupted run's steps. SIGINT or SIGTERM finishes the
step, saves and stops (``FinetuneResult.stop_signal``).

A checkpoint holds the fine-tuned ``encoder`` and ``config.model`` as a pretraining checkpoint does
(so ``ijepa-eval FOLDER/checkpoints/latest.pt --which context`` probes the fine-tuned encoder), the
``head``, ``opt``, ``rng`` and ``finetune`` (the settings).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ijepa_fast.config import DataConfig
from ijepa_fast.data.evaluation import build_eval_dataset
from ijepa_fast.data.loader import PretrainDataset, StepBatchSampler
from ijepa_fast.data.sources import open_source
from ijepa_fast.data.transforms import normalize
from ijepa_fast.finetune.recipe import (
    RESUME_MAY_CHANGE,
    Classifier,
    FinetuneConfig,
    build_classifier,
    layer_decay_groups,
    set_lr,
)
from ijepa_fast.finetune.report import build_report, write_report, write_text
from ijepa_fast.io import checkpoint as ckpt
from ijepa_fast.io.encoder import LoadedEncoder
from ijepa_fast.runtime.device import autocast, resolve_device, resolve_precision
from ijepa_fast.runtime.rng import mix
from ijepa_fast.train import run_folder
from ijepa_fast.train.metrics import MetricsWriter
from ijepa_fast.train.schedules import Schedules
from ijepa_fast.train.signals import StopOnSignals

log = logging.getLogger(__name__)

SETTINGS_NAME = "finetune.json"
# What a fine-tuning folder holds (hidden names aside: the atomic writes' temporary files)
FOLDER_ENTRIES = (SETTINGS_NAME, "checkpoints", "metrics.csv", "report.json", "report.md", run_folder.LOCK_NAME)


class SettingsChangedError(run_folder.RunFolderError):
    """A resume with other settings than the fine-tuning it continues."""


def check_folder(out_dir: Path) -> None:
    """Refuse an ``--out`` that holds anything but a fine-tuning (a pretraining run folder above all: its
    checkpoints would pass for a fine-tuning's), before anything is written there."""
    if not out_dir.is_dir():
        return
    if (out_dir / run_folder.CONFIG_NAME).exists():
        raise run_folder.RunFolderError(
            f"--out {out_dir} is a pretraining run folder, not a fine-tuning one: choose another --out "
            f"(without --out, a run folder's fine-tuning goes to {out_dir / 'finetune'})"
        )
    others = sorted(e.name for e in out_dir.iterdir() if e.name not in FOLDER_ENTRIES and not e.name.startswith("."))
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise run_folder.RunFolderError(
            f"--out {out_dir} holds other files than a fine-tuning's ({shown}): choose another --out"
        )
    if ckpt.list_checkpoints(out_dir / "checkpoints") and not (out_dir / SETTINGS_NAME).is_file():
        raise run_folder.RunFolderError(  # a fine-tuning writes its settings before its first checkpoint
            f"--out {out_dir} holds checkpoints but no {SETTINGS_NAME}: they are not a fine-tuning's; "
            "choose another --out"
        )


@dataclass
class FinetuneResult:
    out_dir: Path
    steps: int
    top1: float | None  # test top-1 in [0, 1] after the last step; None when stopped by a signal
    checkpoint: Path | None
    report: dict
    stop_signal: int | None = None


def _collate(items: list[tuple[torch.Tensor, int, int, int, str]]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``PretrainDataset`` items of one step -> (images [B, 3, S, S] normalised, labels [B], skipped)."""
    images, labels, _, _, bad = zip(*items)
    return normalize(torch.stack(images)), torch.as_tensor(labels, dtype=torch.int64), sum(1 for b in bad if b)


def train_batches(cfg: FinetuneConfig, data: DataConfig, start_step: int) -> tuple[torch.utils.data.DataLoader, int]:
    """(loader of (images, labels, skipped) for steps start_step, start_step + 1, ..., steps per epoch):
    random-resized crops drawn from (seed, epoch, image), batches from (seed, step)."""
    dataset = PretrainDataset(open_source(data), data.crop_size, cfg.crop_scale, cfg.seed, cfg.limit)
    sampler = StepBatchSampler(len(dataset), cfg.batch_size, cfg.seed, start_step=start_step)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=_collate,
        num_workers=cfg.num_workers,
        generator=torch.Generator().manual_seed(mix(cfg.seed, 1)),  # not the global RNG, which a resume restores
    )
    return loader, sampler.steps_per_epoch


def count_classes(data: DataConfig, *splits: str) -> int:
    """1 + the largest label of the splits (their label arrays, no image decoded)."""
    return 1 + max(int(open_source(data, split).labels.max()) for split in splits)


@torch.no_grad()
def top1(model: Classifier, dataset, batch_size: int, num_workers: int, amp: torch.dtype | None) -> float:
    """Test top-1 in [0, 1] of ``model`` (eval mode: no drop path) over ``dataset``."""
    device = next(model.parameters()).device
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    model.eval()
    correct = total = 0
    with autocast(device, amp):
        for images, labels in loader:
            pred = model(images.to(device)).argmax(1).cpu()
            correct += int((pred == torch.as_tensor(labels)).sum())
            total += len(pred)
    model.train()
    return correct / max(total, 1)


class Finetuner:
    """Fine-tunes ``loaded`` (the pretrained encoder, ``io.load.load_encoder``) into ``out_dir``.
    Built when constructed (the folder locked, settings checked, a checkpoint restored on ``resume``);
    ``fit()`` trains to the end or to a stop, scores the test split and writes the report."""

    def __init__(self, loaded: LoadedEncoder, cfg: FinetuneConfig, out_dir: Path, resume: bool = False):
        self.cfg, self.loaded, self.out_dir, self.resume = cfg.validate(), loaded, Path(out_dir), resume
        self.device = resolve_device(cfg.device, option="--device")
        check_folder(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.lock = run_folder.RunLock(self.out_dir)
        self.lock.acquire()
        try:
            self._build()
        except BaseException:
            self.lock.release()
            raise

    def _build(self) -> None:
        cfg = self.cfg
        self.ckpt_dir = self.out_dir / "checkpoints"
        ckpt.remove_partial_files(self.ckpt_dir)
        restored = self._restorable()
        self.precision = resolve_precision(self.device, cfg.dtype, option="--dtype")
        self.test_split = test_split = cfg.test_split or ("test" if cfg.dataset == "idx" else "val")
        self.data = DataConfig(
            dataset=cfg.dataset, root=cfg.data, split=cfg.train_split, crop_size=self.loaded.spec.img_size
        )
        self.test_set = build_eval_dataset(self.data, split=test_split, limit=cfg.limit)
        self.num_classes = count_classes(self.data, cfg.train_split, test_split)
        torch.manual_seed(cfg.seed)  # the head's init
        self.model = build_classifier(self.loaded.encoder, self.num_classes, cfg).to(self.device)
        groups = layer_decay_groups(self.model, cfg.lr, cfg.weight_decay, cfg.layer_decay)
        fused = self.device.type in ("cuda", "cpu")
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=fused)
        self.start_step = 0
        if restored is not None:
            self._load(restored)
        self.loader, self.steps_per_epoch = train_batches(cfg, self.data, self.start_step)
        total = cfg.epochs * self.steps_per_epoch
        self.schedule = Schedules(
            total_steps=total,
            warmup_steps=min(int(cfg.warmup_epochs * self.steps_per_epoch), total),
            start_lr=cfg.start_lr,
            lr=cfg.lr,
            final_lr=cfg.min_lr,
            weight_decay=cfg.weight_decay,
            final_weight_decay=cfg.weight_decay,
        )
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        self._write_settings()

    # ------------------------------------------------------------------ the folder
    def _restorable(self) -> dict | None:
        """The checkpoint to continue from (``--resume``), its settings checked against ours; a folder
        with checkpoints and no ``--resume`` is refused."""
        if ckpt.list_checkpoints(self.ckpt_dir) and not self.resume:
            raise FileExistsError(
                f"{self.out_dir} already holds a fine-tuning: pass --resume to continue it, or choose --out"
            )
        if not self.resume:
            return None
        path = self.out_dir / SETTINGS_NAME
        if path.is_file():
            self._check_settings(json.loads(path.read_text()))
        state = ckpt.load_latest(self.ckpt_dir)
        if state is None:
            log.warning("--resume: no checkpoint in %s, starting from the pretrained encoder", self.ckpt_dir)
            return None
        self._check_settings(state)
        return state

    def _check_settings(self, stored: dict[str, Any]) -> None:
        """Refuse a resume whose settings or pretrained checkpoint (``stored``: finetune.json's record,
        or a checkpoint) differ from the fine-tuning's: its weights descend from that checkpoint."""
        settings = FinetuneConfig.from_dict(stored["finetune"]).to_dict()
        changed = {
            k: (v, getattr(self.cfg, k))
            for k, v in settings.items()
            if k not in RESUME_MAY_CHANGE and self.cfg.to_dict()[k] != v
        }
        source = stored.get("source")
        if source is not None and not _same_file(source, self.loaded.path):
            changed["source"] = (source, str(self.loaded.path))
        if changed:
            lines = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise SettingsChangedError(
                f"{self.out_dir} was fine-tuned with other settings ({lines}): keep them, or choose another --out"
            )

    def _write_settings(self) -> None:
        record = {"source": str(self.loaded.path), "finetune": self.cfg.to_dict()}
        write_text(self.out_dir / SETTINGS_NAME, json.dumps(record, indent=2) + "\n")

    # ------------------------------------------------------------------ checkpoints
    def _state(self, step: int) -> dict[str, Any]:
        spec = self.loaded.spec
        model_cfg = {"name": spec.name, "patch_size": spec.patch_size, "depth": spec.depth}
        return {
            "encoder": self.model.encoder.state_dict(),
            "head": self.model.head.state_dict(),
            "opt": self.optimizer.state_dict(),
            "finetune": self.cfg.to_dict(),
            "num_classes": self.num_classes,
            "source": str(self.loaded.path),
            "config": {"model": model_cfg, "data": {"crop_size": spec.img_size}},
            "rng": ckpt.rng_state(),
        }

    def _save(self, step: int) -> Path:
        return ckpt.save_checkpoint(self.ckpt_dir, self._state(step), step, self.cfg.keep_checkpoints)

    def _load(self, state: dict) -> None:
        self.model.encoder.load_state_dict(state["encoder"])
        self.model.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["opt"])
        ckpt.set_rng_state(state["rng"])
        self.start_step = int(state["step"])
        log.info("resumed fine-tuning at step %d (%s)", self.start_step, self.ckpt_dir)

    # ------------------------------------------------------------------ the loop
    def fit(self) -> FinetuneResult:
        try:
            return self._fit()
        finally:
            self.lock.release()

    def _fit(self) -> FinetuneResult:
        step, amp, signals, started = (
            self.start_step,
            self.precision.autocast_dtype,
            StopOnSignals(),
            time.perf_counter(),
        )
        writer = MetricsWriter(self.out_dir, tensorboard=False, start_step=step)  # rows past a resume's step dropped
        log.info("fine-tuning steps %d..%d (%d per epoch), %s", step, self.total_steps, self.steps_per_epoch, self.cfg)
        saved_step, saved, losses = None, None, []
        self.model.train()
        with signals, contextlib.closing(writer):
            for images, labels, _skipped in self.loader:
                if step >= self.total_steps or signals.received is not None:
                    break
                losses.append(self._step(images, labels, step, amp))
                step += 1
                if step % self.cfg.log_every == 0 or step == self.total_steps:
                    self._log_row(writer, step, torch.stack(losses).mean().item(), time.perf_counter() - started)
                    losses = []  # one host read per log
                if step % self.cfg.checkpoint_every == 0:
                    saved, saved_step = self._save(step), step
        if saved_step != step:
            saved = self._save(step)
        if signals.received is not None:
            return FinetuneResult(self.out_dir, step, None, saved, {}, signals.received)
        accuracy = top1(self.model, self.test_set, max(self.cfg.batch_size, 256), self.cfg.num_workers, amp)
        report = self._report(step, accuracy, time.perf_counter() - started, saved)
        return FinetuneResult(self.out_dir, step, accuracy, saved, report)

    def _step(self, images: torch.Tensor, labels: torch.Tensor, step: int, amp: torch.dtype | None) -> torch.Tensor:
        """One optimizer step at ``step``'s learning rate; its loss as a device tensor (no host read)."""
        cfg = self.cfg
        set_lr(self.optimizer, self.schedule.lr_at(step))
        with autocast(self.device, amp):
            logits = self.model(images.to(self.device))  # (B, K)
        loss = F.cross_entropy(logits.float(), labels.to(self.device), label_smoothing=cfg.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        return loss.detach()

    def _log_row(self, writer: MetricsWriter, step: int, loss: float, elapsed: float) -> None:
        lr = self.schedule.lr_at(step - 1)
        log.info("step %d/%d loss %.4f lr %.2e", step, self.total_steps, loss, lr)
        epoch = (step - 1) // self.steps_per_epoch
        writer.write({"step": step, "epoch": epoch, "loss": loss, "lr": lr, "elapsed_s": round(elapsed, 3)})

    def _report(self, step: int, accuracy: float, seconds: float, saved: Path) -> dict:
        report = build_report(self, step, accuracy, seconds, saved)
        write_report(report, self.out_dir)
        return report


def _same_file(a: str, b: str) -> bool:
    """Whether two paths name the same checkpoint, each as given (relative, absolute, through a link)."""
    return Path(a).resolve() == Path(b).resolve()


def finetune_config_for(args_values: dict[str, Any]) -> FinetuneConfig:
    """A ``FinetuneConfig`` from option values (names as its fields; None: the default)."""
    return replace(FinetuneConfig(), **{k: v for k, v in args_values.items() if v is not None}).validate()
