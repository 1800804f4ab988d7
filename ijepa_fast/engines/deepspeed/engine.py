"""The DeepSpeed ZeRO engine (stages 0-3): ``step.Engine``, ZeRO-aware EMA views, checkpoints and a
consolidated export.

The student (context encoder + predictor, ``JEPAStudent``) trains inside ``deepspeed.initialize``;
``step.TrainStep`` drives it like any engine: our schedules set each AdamW group's learning rate
and weight decay, the step divides the loss for gradient accumulation and DeepSpeed runs with
``managed_gradient_accumulation`` off, so every ``step()`` is an optimizer step. The target encoder:

- stages 0-2: a full replica on every rank, EMA over full parameters; every rank applies the same
  update to the same (all-gathered) student weights, so replicas agree.
- stage 3: partitioned exactly like the student by a second engine without optimizer. A parameter's
  partition depends only on its size and the world size, so ``target.ds_tensor`` and
  ``student.encoder.ds_tensor`` hold the same slice: the EMA runs shard by shard on the local
  partitions, with no collective. Only the target's forward gathers (layer by layer, as ZeRO-3
  does for any module). Its persistence thresholds are 0 so no gathered copy outlives a forward
  and goes stale after the EMA writes the partitions.

Precision: fp32 weights at every stage; ``run.dtype`` bf16 runs the forward under the step's bf16
autocast, as the plain engine and the authors do. So the EMA averages the fp32 weights (at stage 3,
this rank's fp32 partitions), gradients are fp32 and are reduced in fp32. DeepSpeed's ``bf16`` mode
is not used: it stores the weights, the residual stream and each rank's gradients in bf16, so it
would not compute the plain bf16 step (fp32 weights under autocast). The cost: fp32 weights and
gradients on every rank, and ZeRO-3 gathers fp32 weights. No step reads the device from the host,
and a non-finite step is skipped on the device (``patches.FiniteStep``).

Checkpoints go through the engine, plus one small file per rank (``files``), checked before the
engine loads. Every file is read back with ``checkpoint.load_file`` (weights only; DeepSpeed's own
loader unpickles in full): its engine gets a checkpoint engine whose ``load`` is ours
(``patches.safe_checkpoint_files``). ``export_consolidated`` writes a plain fp32 checkpoint in
``ijepa_fast.io.checkpoint``'s format (encoder / predictor / target_encoder state dicts) that
``ijepa-eval`` and ``interop.load_encoder`` read without DeepSpeed.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ijepa_fast.engines.deepspeed import files, patches
from ijepa_fast.engines.deepspeed import universal as uc
from ijepa_fast.engines.deepspeed.config import global_batch, target_config
from ijepa_fast.io import checkpoint as ckpt
from ijepa_fast.masks.sampler import MaskBatch
from ijepa_fast.models.ijepa import JEPAStudent
from ijepa_fast.runtime import distributed as dist_
from ijepa_fast.runtime.optional import require
from ijepa_fast.train.optim import param_groups
from ijepa_fast.train.step import PhaseMark, all_finite

log = logging.getLogger(__name__)


class DeepSpeedEngine:
    """Implements ``step.Engine`` with a DeepSpeed engine; every rank calls every method (collectives).

    ``forward`` takes this rank's micro batch; ``mean_over_ranks`` gives every rank the same loss,
    so a non-finite loss stops all of them at the same step.
    """

    name = "deepspeed"
    overflow = None  # no loss scaler: run.dtype=fp16 is refused with this engine (config.schema, deepspeed.config)

    def __init__(self, student: JEPAStudent, target_encoder: nn.Module, ds_config: dict, device: torch.device):
        ds = require("deepspeed", "run.engine=deepspeed")
        self.ds_config = ds_config
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        self.device = device
        self.engine, self.optimizer, _, _ = ds.initialize(
            model=student, model_parameters=param_groups(student), config=ds_config
        )
        patches.safe_checkpoint_files(self.engine)
        # the torch optimizer DeepSpeed steps: the ZeRO optimizer's inner one, or at stage 0 itself
        self._torch_optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
        self._steps = patches.FiniteStep(self._torch_optimizer, self.zero_stage)
        self.skips_non_finite = self._steps.skips_non_finite
        self.student: JEPAStudent = self.engine.module
        if self.zero_stage == 3:
            self.target_engine = patches.safe_checkpoint_files(
                ds.initialize(model=target_encoder, config=target_config(ds_config))[0]
            )
            self.target_encoder = self.target_engine.module
            self._target_forward = self.target_engine
            self._check_partitions()
        else:
            self.target_engine = None
            self.target_encoder = target_encoder.to(device)
            self._target_forward = self.target_encoder
        # background saves (``background``): the last save's host copies, by file name, reused as the
        # next one's buffers; and the gloo group of the writes' barrier, made at the first save
        self._staged: dict[str, Any] = {}
        self._write_group = None
        total, micro, ranks, accum = global_batch(ds_config)
        log.info(
            "DeepSpeed ZeRO stage %d: global batch %d = %d per rank x %d ranks x %d accumulation",
            self.zero_stage,
            total,
            micro,
            ranks,
            accum,
        )

    @property
    def shards_target(self) -> bool:
        """ZeRO-3 partitions the target encoder over the ranks (step.Engine)."""
        return self.zero_stage == 3

    # ------------------------------------------------------------------ the step's calls
    def forward(self, images: torch.Tensor, masks: MaskBatch, targets: torch.Tensor, mark: PhaseMark) -> torch.Tensor:
        return self.engine(images, masks.context, masks.targets, targets, mark=mark)

    def target_forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._target_forward(images)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the step already divided it

    def step(self, finite: torch.Tensor) -> torch.Tensor:
        return self._steps.step(self.engine, finite)

    def mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        return dist_.all_mean_(value.float().clone())

    # ------------------------------------------------------------------ EMA
    def _shards(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(target partitions, student-encoder partitions) of this rank, in parameter order."""
        t = [p.ds_tensor for p in self.target_encoder.parameters()]
        s = [p.ds_tensor for p in self.student.encoder.parameters()]
        return t, s

    def _check_partitions(self) -> None:
        pairs = zip(self.target_encoder.named_parameters(), self.student.encoder.named_parameters())
        for (tn, t), (sn, s) in pairs:
            if tn != sn or t.ds_shape != s.ds_shape or t.ds_tensor.numel() != s.ds_tensor.numel():
                raise RuntimeError(
                    f"ZeRO-3 partitions of target {tn} {tuple(t.ds_shape)} and encoder {sn} "
                    f"{tuple(s.ds_shape)} differ: the shard-local EMA needs identical layouts"
                )

    def ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Stages 0-2: the full parameters. Stage 3: this rank's partitions only (no collective)."""
        if self.zero_stage == 3:
            return self._shards()
        return list(self.target_encoder.parameters()), list(self.student.encoder.parameters())

    def weights_finite(self) -> torch.Tensor:
        """Collective: 0-d bool tensor, the same on every rank, true when every rank's weights (its
        partitions under ZeRO-3) of the student and the target encoder are finite."""
        params = [*self.student.parameters(), *self.target_encoder.parameters()]
        local = all_finite([p.ds_tensor for p in params] if self.zero_stage == 3 else params)
        return dist_.all_mean_(local.float()) == 1.0  # the mean of 0/1 flags is 1 only if every rank says 1

    # ------------------------------------------------------------------ checkpoints
    tag = staticmethod(files.tag)

    @staticmethod
    def checkpoint_folders(run_dir: Path, is_main: bool) -> list[tuple[Path, str]]:
        """(folder, what it is) of every folder this rank writes: its own files in ``deepspeed/``,
        and on rank 0 the consolidated export in ``checkpoints/``."""
        own = [(run_dir / "deepspeed", "the DeepSpeed checkpoints folder")]
        return own + ([(run_dir / "checkpoints", "the checkpoints folder")] if is_main else [])

    @staticmethod
    def latest_step(run_dir: Path) -> int | None:
        """The step ``run_dir/deepspeed/latest`` names (None: no DeepSpeed checkpoint)."""
        return files.latest_step(run_dir / "deepspeed")

    @staticmethod
    def saved_ranks(run_dir: Path) -> int | None:
        """The number of ranks that wrote the tag ``run_dir/deepspeed/latest`` names (None: none)."""
        step = files.latest_step(run_dir / "deepspeed")
        return None if step is None else files.saved_world_size(run_dir / "deepspeed" / files.tag(step))

    def save(self, run_dir: Path, step: int, meta: dict, keep: int) -> Path | None:
        """Collective: the engine checkpoint in ``run_dir/deepspeed`` (what ``--resume`` reads), then
        a consolidated fp32 export in ``run_dir/checkpoints`` (what ijepa-eval reads; its path on
        rank 0, None elsewhere)."""
        run_dir = Path(run_dir)
        self.save_checkpoint(run_dir / "deepspeed", step, meta, keep=keep)
        return self.export_consolidated(run_dir / "checkpoints", step, {**meta, "rng": ckpt.rng_state()}, keep=keep)

    def save_async(self, run_dir: Path, step: int, meta: dict, keep: int):
        """Collective: what ``save`` writes, copied to host memory now; returns (the export's path on
        rank 0, None elsewhere; the write, which every rank runs in the background): ``background``."""
        from ijepa_fast.engines.deepspeed.background import stage_save

        return stage_save(self, Path(run_dir), step, meta, keep)

    def finish_saves(self) -> None:
        """Nothing to wait for here: the trainer's ``Checkpointer`` joins the writes of ``save_async``."""

    def checkpoint_bytes(self) -> int:
        """About how many bytes one ``save`` writes, every rank's files together (``files.checkpoint_bytes``)."""
        return files.checkpoint_bytes(self.student, self.target_encoder, self.zero_stage)

    def load(self, run_dir: Path, check=None) -> dict | None:
        """Collective: restore ``run_dir/deepspeed``'s latest tag; ``check(client_state)`` may refuse
        it. Returns the client state (with ``step``) or None when there is no checkpoint."""
        return self.load_checkpoint(Path(run_dir) / "deepspeed", check=check)

    def save_checkpoint(self, save_dir: str | Path, step: int, client_state: dict | None = None, keep: int = 0) -> Path:
        """Collective: every rank calls it. Returns ``save_dir/step_XXXXXXXX``.

        ``client_state`` (schedules, sampler state, config...: the same on every rank) goes through
        the engine; the target encoder goes there too (stages 0-2) or, with the RNG state, into
        this rank's own file (its stage-3 partitions). ``keep`` > 0 deletes tags older than the
        newest ``keep`` up to this one; newer tags (left by an interrupted save: ``latest`` never
        named them) are neither counted nor deleted.
        """
        save_dir, tag = Path(save_dir), self.tag(step)
        (save_dir / tag).mkdir(parents=True, exist_ok=True)
        ckpt.atomic_torch_save(self.own_state(step), files.rank_file(save_dir / tag, dist_.get_rank()))
        self.engine.save_checkpoint(
            str(save_dir), tag=tag, client_state=self.client_state(client_state, step), save_latest=False
        )
        dist_.barrier()  # every rank's files are complete before ``latest`` names the tag
        self.name_tag(save_dir, step, keep)
        dist_.barrier()
        return save_dir / tag

    def own_state(self, step: int) -> dict[str, Any]:
        """What this rank's own file of a tag holds: RNG state and, at stage 3, its target partitions."""
        own: dict[str, Any] = {
            "step": step,
            "rank": dist_.get_rank(),
            "world_size": dist_.get_world_size(),
            "zero_stage": self.zero_stage,
            "rng": ckpt.rng_state(),
        }
        if self.zero_stage == 3:
            own["target_partitions"] = [t.detach().cpu().clone() for t in self._shards()[0]]
        return own

    def client_state(self, client_state: dict | None, step: int) -> dict[str, Any]:
        """What goes through DeepSpeed's own files: ours, and at stages 0-2 the target encoder."""
        client = {
            **(client_state or {}),
            "step": step,
            "world_size": dist_.get_world_size(),
            "zero_stage": self.zero_stage,
        }
        if self.zero_stage < 3:
            client["target_encoder"] = {k: v.detach().cpu() for k, v in self.target_encoder.state_dict().items()}
        return client

    def name_tag(self, save_dir: Path, step: int, keep: int) -> None:
        """Rank 0, once every rank's files of ``step`` are complete: ``latest`` names it, and tags older
        than the newest ``keep`` up to it are deleted."""
        if dist_.get_rank() != 0:
            return
        files.write_latest(save_dir, self.tag(step))
        if keep > 0:
            for old in [s for s in files.list_tags(save_dir) if s <= step][:-keep]:
                shutil.rmtree(save_dir / self.tag(old), ignore_errors=True)

    def load_checkpoint(self, load_dir: str | Path, step: int | None = None, check=None) -> dict | None:
        """Collective. Restore engine, optimizer, target encoder and RNG from ``step`` (default:
        ``latest``); return the client state, or None when there is no checkpoint.

        A ZeRO checkpoint written by another number of ranks is converted to DeepSpeed's universal
        checkpoint first (rank 0, into ``load_dir/universal/<tag>``, deleted once every rank has
        loaded it; without ZeRO every rank's file holds everything). A rank the checkpoint has no
        file for takes the RNG state of rank ``rank % saved``.
        """
        load_dir = Path(load_dir)
        step = files.latest_step(load_dir) if step is None else step
        if step is None:
            return None
        tag_dir, rank, world = load_dir / self.tag(step), dist_.get_rank(), dist_.get_world_size()
        saved_world = files.saved_world_size(tag_dir)
        own = ckpt.load_file(files.rank_file(tag_dir, rank % saved_world), override=None)
        # Before the engine loads: DeepSpeed meets another stage's files with a bare assertion.
        files.check_zero_stage(tag_dir, own.get("zero_stage"), self.zero_stage)
        if saved_world == world or self.zero_stage == 0:
            path, client = self.engine.load_checkpoint(
                str(load_dir), tag=tag_dir.name, load_optimizer_states=True, load_lr_scheduler_states=False
            )
            if path is None:
                raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag_dir.name} in {load_dir}")
            target_partitions = own.get("target_partitions")
        else:
            client, target_partitions = self._load_resharded(tag_dir, saved_world)
        files.check_zero_stage(tag_dir, client.get("zero_stage"), self.zero_stage)
        if check is not None:
            check(client)
        with torch.no_grad():
            if self.zero_stage == 3:
                for t, saved in zip(self._shards()[0], target_partitions, strict=True):
                    t.copy_(saved)
            else:
                self.target_encoder.load_state_dict(client["target_encoder"])
        ckpt.set_rng_state(own["rng"])
        return client

    def _load_resharded(self, tag_dir: Path, saved_world: int) -> tuple[dict, list[torch.Tensor] | None]:
        """Collective: load ``tag_dir`` (written by ``saved_world`` ranks) through DeepSpeed's universal
        checkpoint; returns the client state and, at stage 3, this rank's target-encoder partitions."""
        universal = files.universal_folder(tag_dir)
        allowed = patches.deepspeed_safe_globals()

        def convert() -> None:  # rank 0 writes, the others wait in the agreeing collective
            if dist_.get_rank() == 0 and not uc.is_converted(universal):
                files.convert_to_universal(tag_dir, universal, self.zero_stage)

        failed, error = dist_.failure_on_any_rank(convert, self.device)
        if failed:
            raise error or RuntimeError(f"another rank could not convert {tag_dir}; its log says why")
        with (
            patches.groups_kept_through_universal_load(self.optimizer),
            patches.universal_checkpoint_load(self.engine, allowed),
        ):
            path, client = self.engine.load_checkpoint(
                str(universal.parent), tag=universal.name, load_optimizer_states=True, load_lr_scheduler_states=False
            )
        if path is None:
            raise FileNotFoundError(f"DeepSpeed found no universal checkpoint in {universal}")
        partitions = self._target_partitions_from(universal) if self.zero_stage == 3 else None
        dist_.barrier()  # every rank has read the universal folder
        if dist_.get_rank() == 0:
            shutil.rmtree(universal.parent, ignore_errors=True)
        log.info("resumed %s, written by %d rank(s), on %d", tag_dir, saved_world, dist_.get_world_size())
        return client, partitions

    def _target_partitions_from(self, universal: Path) -> list[torch.Tensor]:
        """This rank's partition of each target-encoder parameter, from the joined flat parameters."""
        flat = ckpt.load_file(universal / uc.TARGET_FILE, override=None)
        rank = dist_.get_rank()
        return [
            uc.partition_of(f, p.ds_numel, rank, p.ds_tensor.numel())
            for f, p in zip(flat, self.target_encoder.parameters(), strict=True)
        ]

    # ------------------------------------------------------------------ export
    def _full_fp32(self, param: nn.Parameter) -> torch.Tensor:
        """Collective under ZeRO: the whole fp32 parameter (master weights when the engine has them)."""
        from deepspeed.utils import safe_get_full_fp32_param

        full = safe_get_full_fp32_param(param) if param.requires_grad else None
        if full is None and hasattr(param, "ds_id"):  # stage 3, no optimizer copy (frozen, or target)
            from deepspeed.runtime.zero import GatheredParameters

            with GatheredParameters([param], modifier_rank=None):
                full = param.detach().float().clone()
        elif full is None:
            full = param.detach()
        shape = param.ds_shape if hasattr(param, "ds_shape") else param.shape
        return full.reshape(shape).float().cpu().clone()

    def _module_fp32(self, module: nn.Module) -> dict[str, torch.Tensor]:
        out = {name: self._full_fp32(p) for name, p in module.named_parameters()}
        out.update({name: b.detach().cpu().clone() for name, b in module.named_buffers()})
        return out

    def consolidated_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Collective: fp32 ``encoder``, ``predictor`` and ``target_encoder`` state dicts (no
        ``module.`` prefix) on every rank."""
        return {
            "encoder": self._module_fp32(self.student.encoder),
            "predictor": self._module_fp32(self.student.predictor),
            "target_encoder": self._module_fp32(self.target_encoder),
        }

    def export_consolidated(
        self, ckpt_dir: str | Path, step: int, extra: dict | None = None, keep: int = 3
    ) -> Path | None:
        """Collective: rank 0 writes ``ckpt_dir/ckpt-XXXXXXXX.pt`` in ``ijepa_fast.io.checkpoint``'s
        format (read by ``ijepa-eval`` without DeepSpeed); returns its path there, None elsewhere.

        ``opt`` is empty: the optimizer state lives in the DeepSpeed checkpoint.
        """
        state = self.export_state(extra)
        return None if state is None else ckpt.save_checkpoint(Path(ckpt_dir), state, step, keep)

    def export_state(self, extra: dict | None = None) -> dict[str, Any] | None:
        """Collective: the consolidated export's contents on rank 0, None elsewhere."""
        state = self.consolidated_state()
        if dist_.get_rank() != 0:
            return None
        return {
            **(extra or {}),
            **state,
            "opt": {},
            "world_size": dist_.get_world_size(),
            "engine": "deepspeed",
            "zero_stage": self.zero_stage,
        }
