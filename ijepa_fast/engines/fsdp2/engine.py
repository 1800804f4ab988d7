"""The FSDP2 engine: PyTorch's ``fully_shard`` over the ranks a launcher started, checkpoints through
``torch.distributed.checkpoint`` (``engines.fsdp2.checkpoint``).

Sharding: ``fully_shard`` on every transformer block, then on the root (the student, and the target
encoder), over a 1-D device mesh of every rank. Each parameter is a DTensor sharded on dim 0; a
block's parameters are all-gathered just before its forward (and again for its backward) and freed
after. The target encoder is sharded the same way, so each rank holds the same rows of a target
parameter as of its encoder twin: the EMA runs on the local shards (``DTensor.to_local()``, the
fused EMA kernel) with no collective. Its root reshards after its forward too (FSDP2 keeps the
root's parameters gathered after forward by default, for the backward that the target never runs;
a gathered copy would go stale when the EMA writes the shards).

Precision (``run.dtype`` bf16, on GPUs): the blocks gather their parameters in bf16 (``param_dtype``) and
reduce-scatter gradients in fp32 (``reduce_dtype``); the sharded parameters, which the optimizer
steps and the EMA averages, stay fp32 master weights. The step's autocast stays on, and the blocks
do not cast their inputs (``cast_forward_inputs=False``), so the residual stream keeps the dtype it
has in the plain engine; the root (patch embedding, positional embeddings, mask token, final norms) keeps
fp32 parameters. The DeepSpeed engine keeps fp32 weights everywhere and lets autocast cast them per
op: a matmul sees the same bf16 weight either way (the same round-to-nearest cast, done before the
all-gather here instead of inside autocast), and the gradient reduction is fp32 in both. The one
numerical difference: the blocks' LayerNorm weights and biases reach autocast's fp32 LayerNorm
rounded to bf16 here (their gradients are rounded to bf16 before the fp32 reduction too). In
exchange, each rank gathers half the bytes ZeRO-3 gathers (bf16, not fp32). On a CPU the blocks
gather fp32, as the DeepSpeed engine holds them (``precision``: CPU autocast would run LayerNorm
with bf16 weights on an fp32 input, which it refuses), so the numerics are the DeepSpeed engine's.

Compile: the blocks are compiled one by one before they are sharded (``models.vit.compile_blocks``);
FSDP2's hooks run outside the compiled graphs, so each block compiles once (tested: no recompile
after the first step). A non-finite step is skipped on the device as in the plain engine: torch's
fused AdamW takes the flag as ``found_inf``; the gradient norm that decides it is the global one
(without clipping, the ranks agree on their local shards), so a non-finite loss or gradient on one
rank skips the step on every rank. The run-folder lock, the collective timeout (every group, the
checkpoint's gloo group included), the save on SIGTERM and the refusal of a resume by another engine
are the trainer's and ``train.build``'s, as for the other engines.

Choice: ``run.engine=auto`` never picks this engine; DeepSpeed stays the default under a launcher
until a measurement gives a reason to change it (the gpu-check ``deepspeed`` stage times this engine
beside ZeRO-2 and ZeRO-3: images/s and peak memory).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ijepa_fast.engines.fsdp2 import checkpoint as dcp_ckpt
from ijepa_fast.engines.fsdp2.precision import mixed_precision, param_dtype
from ijepa_fast.engines.plain import PlainEngine
from ijepa_fast.models.ijepa import JEPAStudent
from ijepa_fast.models.vit import Block
from ijepa_fast.runtime import distributed as dist_
from ijepa_fast.train.optim import build_optimizer
from ijepa_fast.train.step import all_finite

log = logging.getLogger(__name__)


def shard(module: nn.Module, mesh, amp_dtype: torch.dtype | None) -> nn.Module:
    """``fully_shard`` every ``Block`` of ``module``, then ``module`` itself; in place, returned."""
    from torch.distributed.fsdp import fully_shard

    for sub in module.modules():
        if isinstance(sub, Block):
            policy = mixed_precision(amp_dtype, True, mesh.device_type)
            fully_shard(sub, mesh=mesh, reshard_after_forward=True, mp_policy=policy)
    # the root reshards after forward too: see the module docstring (the target encoder's EMA)
    policy = mixed_precision(amp_dtype, False, mesh.device_type)
    fully_shard(module, mesh=mesh, reshard_after_forward=True, mp_policy=policy)
    return module


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (the tensor itself otherwise): the storage the optimizer
    writes, so an in-place update of it updates the parameter."""
    return tensor._local_tensor if hasattr(tensor, "_local_tensor") else tensor


class FSDP2Engine(PlainEngine):
    """Implements ``step.Engine`` over FSDP2-sharded student and target encoder; every rank calls
    every method (collectives). The step's calls, the optimizer step and its non-finite skip are the
    plain engine's: only what reads a whole tensor differs (the gradient norm is global, the finite
    checks agree across ranks, the EMA and finite checks see local shards)."""

    name = "fsdp2"
    shards_target = True

    def __init__(
        self,
        student: JEPAStudent,
        target_encoder: nn.Module,
        optim_cfg,
        device: torch.device,
        amp_dtype: torch.dtype | None,
        fused_optimizer: bool = True,
    ):
        from torch.distributed.device_mesh import init_device_mesh

        if not dist_.is_initialized():
            raise RuntimeError("run.engine=fsdp2 needs a process group: start it with runtime.distributed.init")
        self.mesh = init_device_mesh(device.type, (dist_.get_world_size(),))
        shard(student, self.mesh, amp_dtype)
        shard(target_encoder, self.mesh, amp_dtype)
        optimizer = build_optimizer(student, optim_cfg, device, fused=fused_optimizer)
        super().__init__(student, target_encoder, optimizer, device, grad_clip=optim_cfg.grad_clip)
        self.saver = dcp_ckpt.Saver()
        log.info(
            "FSDP2 over %d rank(s): blocks gathered in %s, gradients reduced in fp32, fp32 master weights",
            dist_.get_world_size(),
            str(param_dtype(amp_dtype, True, device.type) or torch.float32).removeprefix("torch."),
        )

    # ------------------------------------------------------------------ the step's calls
    def _grads_finite(self, norm: torch.Tensor | None) -> torch.Tensor:
        """The same 0-d bool on every rank: from the global norm (a replicated DTensor), or from
        every rank's local gradient shards."""
        if norm is not None:
            return torch.isfinite(local(norm))
        return self._agree(all_finite([local(g) for g in self._grads()]))

    def mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        return dist_.all_mean_(value.float().clone())

    @staticmethod
    def _agree(flag: torch.Tensor) -> torch.Tensor:
        """Collective: true on every rank when ``flag`` is true on every rank (no host sync)."""
        return dist_.all_mean_(flag.float()) == 1.0

    def ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """This rank's shards of the target and the student's encoder, in parameter order: the same
        rows of the same shapes on both sides, so the EMA needs no collective."""
        targets = [local(p) for p in self.target_encoder.parameters()]
        sources = [local(p) for p in self.student.encoder.parameters()]
        return targets, sources

    def weights_finite(self) -> torch.Tensor:
        """Collective: the student's and target's weights are finite on every rank's shards."""
        params = [*self.student.parameters(), *self.target_encoder.parameters()]
        return self._agree(all_finite([local(p) for p in params]))

    # ------------------------------------------------------------------ checkpoints
    @staticmethod
    def checkpoint_folders(run_dir: Path, is_main: bool) -> list[tuple[Path, str]]:
        own = [(Path(run_dir) / dcp_ckpt.FOLDER, "the FSDP2 checkpoints folder")]
        return own + ([(Path(run_dir) / "checkpoints", "the checkpoints folder")] if is_main else [])

    @staticmethod
    def latest_step(run_dir: Path) -> int | None:
        return dcp_ckpt.latest_step(Path(run_dir) / dcp_ckpt.FOLDER)

    @staticmethod
    def saved_ranks(run_dir: Path) -> int | None:
        return dcp_ckpt.saved_ranks(Path(run_dir) / dcp_ckpt.FOLDER)

    @staticmethod
    def remove_partial_files(run_dir: Path) -> list[Path]:
        return dcp_ckpt.remove_partial(Path(run_dir) / dcp_ckpt.FOLDER)

    def state_dict(self) -> dict:
        raise NotImplementedError("FSDP2 checkpoints go through save() (torch.distributed.checkpoint)")

    # ``save`` writes in the background itself (DCP's asynchronous save): no host copy for the trainer
    save_async = None

    def checkpoint_bytes(self) -> int:
        """About how many bytes one checkpoint takes on the run folder's disk: the DCP folder (every
        rank's shards of the fp32 weights and of AdamW's two moments) and the consolidated fp32 copy."""
        weights = sum(p.numel() * 4 for m in (self.student, self.target_encoder) for p in m.parameters())
        moments = sum(2 * p.numel() * 4 for p in self._params)  # a DTensor's numel is the full tensor's
        return 2 * weights + moments

    def save(self, run_dir: Path, step: int, meta: dict, keep: int) -> Path | None:
        """Collective: stage the sharded state and return; the files are written in the background
        (``checkpoint.Saver``). Returns the consolidated copy's path on rank 0 (written once the
        sharded checkpoint is complete), None elsewhere."""
        return self.saver.save(self, Path(run_dir), step, meta, keep)

    def finish_saves(self) -> None:
        """Wait for the checkpoint being written, if any; raise its error."""
        self.saver.wait()

    def load(self, run_dir: Path, check=None) -> dict | None:
        """Collective: restore the newest complete checkpoint of ``run_dir``, written by any number of
        ranks; ``check(meta)`` may refuse it first. Returns its metadata or None."""
        return dcp_ckpt.load(self, Path(run_dir), check)
