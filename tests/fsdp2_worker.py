"""The FSDP2 tests' runs (``tests/test_fsdp2.py``): two ranks started as torchrun would, and a world of one
run inside the test's own process (``in_world_of_one``).

    python tests/fsdp2_worker.py two OUT_DIR    # 2 ranks: 10 compiled steps, an async save at step 3, the
                                                # shard-local EMA check, non-finite steps on rank 1,
                                                # a resume of the 1-rank checkpoint
                                                # ``one_saves`` wrote (1 -> 2); then a save of step 10 that
                                                # never finishes writing (the test kills every rank with -9)

``one_saves`` (a world of one, before): 3 steps on the global batches, saved. ``one_resumes`` (after):
resumes the 2-rank step-3 checkpoint (2 -> 1) and refuses a payload planted in its ``.metadata``.
Every run takes the same tiny model, batches and masks as the DeepSpeed tests (``ds_worker``); a rank
trains on its rows of the global batch, a world of one on all of them. Results go to ``OUT_DIR``.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ijepa_fast.runtime import distributed as dist_
from ijepa_fast.train.schedules import Schedules
from tests import ds_worker as W

STEPS, SAVE_AT = 10, 3
STEPS_PER_EPOCH = 5  # the schedules span the 10 steps: lr, wd and momentum change at every step
WARMUP = 2  # steps before compiled graphs are counted as recompiles
TIMEOUT_S = 42.0  # the collective timeout given to init: a value no library picks by default
RUN2, RUN1 = "run2", "run1"  # run folders saved by two ranks and by one


def tiny_config():
    """``ds_worker``'s tiny run with 2 encoder blocks (the sharding, compile and checkpoint paths are
    the same for 12; every process builds, trains and saves ~6x less)."""
    cfg = W.tiny_config()
    cfg.model.depth = 2
    return cfg.validate()


def fsdp2_step(cfg, seed: int = 0, compile_backend=None):
    """The training step over the FSDP2 engine (its process group already started); blocks compiled
    with ``compile_backend`` when given."""
    from ijepa_fast.engines.fsdp2.engine import FSDP2Engine
    from ijepa_fast.models.vit import compile_blocks
    from ijepa_fast.train.step import TrainStep

    student, target = W.models(cfg, seed)
    if compile_backend is not None:
        real = torch.compile
        torch.compile = lambda *a, **k: real(*a, **{**k, "backend": compile_backend})
        try:
            compile_blocks(student)
            compile_blocks(target)
        finally:
            torch.compile = real
    engine = FSDP2Engine(student, target, cfg.optim, torch.device("cpu"), W.autocast_dtype(cfg))
    return TrainStep(engine, schedules(cfg), W.autocast_dtype(cfg))


def schedules(cfg) -> Schedules:
    return Schedules.from_config(cfg.optim, STEPS_PER_EPOCH)


def batch(step: int, rank: int, world: int):
    """This rank's rows of the 2-rank global batch of ``step`` (a world of one takes all of them)."""
    return W.global_batch(step, 2) if world == 1 else W.local_batch(step, rank, world)


def train(step_fn, steps: range, rank: int, world: int) -> list[float]:
    return [step_fn(*batch(i, rank, world), i)["loss"].item() for i in steps]


def meta(step_fn) -> dict:
    return {"schedules": step_fn.schedules.state_dict(), "config": tiny_config().to_dict()}


def ema_check(engine) -> dict:
    """One EMA update through ``ema_pairs`` (local shards, collectives counted) against the EMA of the
    gathered target and encoder."""
    from ijepa_fast.engines.fsdp2.checkpoint import consolidated_state
    from ijepa_fast.kernels.ema import ema_update_
    from ijepa_fast.train.step import ema_update

    before = consolidated_state(engine)
    with W._CountCollectives() as counter:
        ema_update(*engine.ema_pairs(), 0.75)
    after = consolidated_state(engine)
    if before is None:  # not rank 0
        return {"collectives": counter.count}
    expected = {k: v.clone() for k, v in before["target_encoder"].items()}
    ema_update_(list(expected.values()), list(before["encoder"].values()), 0.75)
    return {"expected": expected, "got": after["target_encoder"], "collectives": counter.count}


def _state_bits(engine) -> list[torch.Tensor]:
    """Copies of this rank's shards of every weight (student, target) and of AdamW's state."""
    from ijepa_fast.engines.fsdp2.engine import local

    params = [*engine.student.parameters(), *engine.target_encoder.parameters()]
    optim = [v for state in engine.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return [local(t).detach().clone() for t in params + optim]


def finite_checks(engine, cfg) -> dict:
    """Rank 1 alone makes a step non-finite: its loss NaN (its images NaN), or one value of its own
    gradient shard inf after the backward, with the gradient clipped (the global norm decides) and
    without (the ranks agree on their local shards). Each step starts from a fresh ``TrainStep`` (its
    flag is sticky). Then rank 1 plants a NaN in its shard of a weight: ``weights_finite`` before and
    after (the NaN removed after). Every rank reports its own view."""
    from ijepa_fast.engines.fsdp2.engine import local
    from ijepa_fast.train.step import TrainStep

    rank, world = dist_.get_rank(), dist_.get_world_size()
    backward, report = engine.backward, {}

    def poisoned_backward(loss):
        backward(loss)
        if rank == 1:
            grad = next(
                local(p.grad) for p in engine.student.parameters() if p.grad is not None and local(p.grad).numel()
            )
            grad.view(-1)[0] = float("inf")

    for case, clip in (("loss", cfg.optim.grad_clip), ("grad_clipped", cfg.optim.grad_clip), ("grad_unclipped", 0.0)):
        images, masks = batch(STEPS, rank, world)
        if case == "loss" and rank == 1:
            images = torch.full_like(images, float("nan"))
        engine.grad_clip, engine.backward = clip, (backward if case == "loss" else poisoned_backward)
        before = _state_bits(engine)
        out = TrainStep(engine, schedules(cfg), W.autocast_dtype(cfg))(images, masks, STEPS)
        after = _state_bits(engine)
        unchanged = len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
        report[case] = {"loss_finite": bool(torch.isfinite(out["loss"])), "step_finite": bool(out["step_finite"])}
        report[case]["unchanged"] = unchanged
    engine.grad_clip, engine.backward = cfg.optim.grad_clip, backward
    weight = next(local(p).view(-1) for p in engine.target_encoder.parameters() if local(p).numel())
    kept = weight[0].clone()
    report["weights_finite"] = [bool(engine.weights_finite())]
    if rank == 1:
        weight[0] = float("nan")
    report["weights_finite"].append(bool(engine.weights_finite()))
    weight[0] = kept
    return report


class _NeverFinishingWriter:
    """Wraps DCP's writer: its data writes start, then hang (the test kills the process meanwhile)."""

    def __init__(self, inner, marker: Path):
        self.inner, self.marker = inner, marker

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def write_data(self, plan, planner):
        self.inner.write_data(plan, planner)  # the shards are on disk, .metadata is not
        self.marker.touch()
        while True:
            time.sleep(1)


def run_two(out: Path) -> None:
    from ijepa_fast.engines.fsdp2 import checkpoint as dcp_ckpt

    rank, world = dist_.get_rank(), dist_.get_world_size()
    graphs = [0]

    def counting_backend(gm, example_inputs):
        graphs[0] += 1
        return gm.forward

    cfg = tiny_config()
    step_fn = fsdp2_step(cfg, compile_backend=counting_backend)
    engine = step_fn.engine
    losses = train(step_fn, range(WARMUP), rank, world)
    warm = graphs[0]
    losses += train(step_fn, range(WARMUP, SAVE_AT), rank, world)
    engine.save(out / RUN2, SAVE_AT, meta(step_fn), keep=3)  # returns after staging; written meanwhile
    losses += train(step_fn, range(SAVE_AT, STEPS), rank, world)
    engine.finish_saves()
    result = {
        "losses": losses,
        "graphs": warm,
        "recompiles": graphs[0] - warm,
        "ema": ema_check(engine),
        "finite": finite_checks(engine, cfg),
        "group_timeouts": W.group_timeouts(),
        "staged_then_trained": dcp_ckpt.latest_step(out / RUN2 / dcp_ckpt.FOLDER),
    }
    result["from1"] = resume_from_one(out)
    torch.save(result, out / f"two_rank{rank}.pt")
    # A save whose writing never ends: the test kills every rank while it hangs.
    real = dcp_ckpt._writer
    dcp_ckpt._writer = lambda tag_dir: _NeverFinishingWriter(real(tag_dir), out / f"writing_rank{rank}")
    engine.save(out / RUN2, STEPS, meta(step_fn), keep=1)
    (out / f"staged_rank{rank}").touch()
    while True:
        time.sleep(1)


def plant_in_metadata(tag_dir: Path, marker: Path) -> Path:
    from tests.payloads import ShellPayload

    path = tag_dir / ".metadata"
    with open(path, "rb") as fh:
        metadata = pickle.load(fh)  # a file this test wrote
    metadata.planner_data = ShellPayload(marker)
    with open(path, "wb") as fh:
        pickle.dump(metadata, fh)
    return path


def one_saves(out: Path) -> dict:
    """A world of one trains steps 1-3 on the global batches and saves them, for ``two`` to resume."""
    step_fn = fsdp2_step(tiny_config())
    losses = train(step_fn, range(SAVE_AT), 0, 1)
    exported = step_fn.engine.save(out / RUN1, SAVE_AT, meta(step_fn), keep=3)
    step_fn.engine.finish_saves()
    return {"losses": losses, "exported": exported, "group_timeouts": W.group_timeouts()}


def one_resumes(out: Path) -> dict:
    """After ``two`` was killed in its last save: what a world of one finds, a planted payload, and
    the resume of the 2-rank step-3 checkpoint (2 -> 1) through step 10."""
    from ijepa_fast.engines.fsdp2 import checkpoint as dcp_ckpt
    from ijepa_fast.io.checkpoint import UntrustedCheckpointError

    cfg, folder = tiny_config(), out / RUN2 / dcp_ckpt.FOLDER
    result = {"latest_after_kill": dcp_ckpt.latest_step(folder), "saved_ranks": dcp_ckpt.saved_ranks(folder)}
    result["removed"] = [p.name for p in dcp_ckpt.remove_partial(folder)]
    planted = out / "planted"
    shutil.copytree(out / RUN2, planted)
    marker = out / "payload_ran"
    path = plant_in_metadata(planted / dcp_ckpt.FOLDER / dcp_ckpt.tag(SAVE_AT), marker)
    result["planted"] = {"error": "", "file": str(path), "marker": str(marker)}
    try:
        fsdp2_step(cfg).engine.load(planted)
    except UntrustedCheckpointError as err:
        result["planted"]["error"] = str(err)
    result.update(resume_from(out / RUN2, 0, 1))
    return result


def resume_from(run_dir: Path, rank: int, world: int) -> dict:
    """Resume ``run_dir``'s step-3 checkpoint from another init and train steps 4-10."""
    from ijepa_fast.engines.fsdp2.checkpoint import consolidated_state

    step_fn = fsdp2_step(tiny_config(), seed=1)  # another init: everything must come from the checkpoint
    torch.manual_seed(123)
    restored = step_fn.engine.load(run_dir)
    rng_restored = torch.equal(torch.get_rng_state(), restored["rng"]["torch"])
    result = {"resumed_from": restored["step"], "rng_restored": rng_restored}
    result["losses"] = train(step_fn, range(SAVE_AT, STEPS), rank, world)
    result["final"] = consolidated_state(step_fn.engine)
    return result


def resume_from_one(out: Path) -> dict:
    return resume_from(out / RUN1, dist_.get_rank(), dist_.get_world_size())


@contextlib.contextmanager
def in_world_of_one():
    """A process group of one in this process (a free port), removed after with the environment
    variables ``init`` exported."""
    saved = {k: os.environ.get(k) for k in dist_.ENV_KEYS}
    dist_.init(dist_.detect({}), timeout_s=TIMEOUT_S)
    try:
        yield
    finally:
        dist_.cleanup()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    dist_.init(timeout_s=TIMEOUT_S)
    {"two": run_two}[mode](out)


if __name__ == "__main__":
    main()
