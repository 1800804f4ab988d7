"""One rank of the DeepSpeed tests (``tests/test_deepspeed.py`` starts several of these).

    python tests/ds_worker.py zero OUT_DIR 1,2,3     # per stage: 5 steps with a save at 3, resume, EMA check;
                                                     # then gradient accumulation under ZeRO-2
    python tests/ds_worker.py single OUT_DIR         # a world of one, ZeRO 0-3: process-group timeouts, and
                                                     # a payload planted in each checkpoint file, resumed;
                                                     # a save whose writes the kernel refuses
    python tests/ds_worker.py locked OUT_DIR KEY=VALUE...  # a trainer on a run folder another process locked
    python tests/ds_worker.py small_disk OUT_DIR KEY=VALUE...  # a trainer whose disk has 1 kB free
    python tests/ds_worker.py hung_write OUT_DIR KEY=VALUE...  # a background write that hangs at step 4
    python tests/ds_worker.py nan OUT_DIR KEY=VALUE...     # a trainer whose loss turns NaN on rank 1
    python tests/ds_worker.py nan_after OUT_DIR STEP KEY=VALUE...  # the same from step index STEP on
    python tests/ds_worker.py die OUT_DIR            # rank 1 dies after one collective

Rank and world come from the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), as torchrun
and the deepspeed launcher set them. Rank 0 writes ``OUT_DIR/result_zero{stage}.pt``; every rank
writes the collapse monitors it measured, ``OUT_DIR/monitors_zero{stage}_rank{rank}.pt``. The
synthetic run (tiny ViT, batches and masks) is defined here once and imported by the test for its
single-process reference.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from functools import partial
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ijepa_fast.config import Config, ModelConfig
from ijepa_fast.masks.sampler import MaskBatch, MultiBlockMaskSampler
from ijepa_fast.models.ijepa import build_models
from ijepa_fast.train.schedules import Schedules

IMG, GRID = 32, 4  # patch 8: a 4 x 4 grid
PER_RANK = 2  # micro batch per rank; the global batch is PER_RANK x world
STEPS, SAVE_AT = 5, 3  # steps in all; checkpoint after SAVE_AT steps
MONITOR_AT = STEPS - 1  # the step that also measures the collapse monitors (on each rank's local batch)
STEPS_PER_EPOCH = 4  # schedules span 4 steps: lr, wd and momentum change at every step
GRAD_CLIP = 0.2  # below the tiny model's gradient norm (0.47 at step 0), so clipping acts
ACCUM, ACCUM_STAGE, ACCUM_STEPS = 2, 2, 3  # gradient accumulation: 2 micro-batches a step under ZeRO-2
FROM_ONE_STAGES = (0, 1, 2, 3)  # saved by a world of one, resumed on two ranks
FROM_TWO_STAGES = (1, 2, 3)  # saved on two ranks (the fp32 runs), resumed by a world of one


def tiny_config(stage: int = 1, batch: int = PER_RANK) -> Config:
    cfg = Config()
    cfg.model = ModelConfig(name="vit_tiny", patch_size=8, pred_depth=1, pred_emb_dim=96)
    cfg.mask.min_keep = 2
    cfg.data.crop_size, cfg.data.batch_size = IMG, batch
    o = cfg.optim
    o.epochs, o.warmup_epochs, o.start_lr, o.lr, o.final_lr = 2, 0.5, 2e-4, 1e-3, 1e-5
    o.weight_decay, o.final_weight_decay, o.ema, o.grad_clip = 0.04, 0.4, (0.9, 1.0), GRAD_CLIP
    cfg.run.zero_stage, cfg.run.dtype, cfg.run.device = stage, "fp32", "cpu"
    cfg.speed.bf16_target_copy = stage != 3  # ZeRO-3 partitions the target encoder: no copy there
    return cfg.validate()


def schedules(cfg: Config) -> Schedules:
    return Schedules.from_config(cfg.optim, STEPS_PER_EPOCH)


def models(cfg: Config, seed: int = 0):
    torch.manual_seed(seed)
    return build_models(cfg.model, IMG)


def autocast_dtype(cfg: Config) -> torch.dtype | None:
    from ijepa_fast.runtime.device import resolve_precision

    return resolve_precision(torch.device("cpu"), cfg.run.dtype).autocast_dtype


def plain_step(cfg: Config, seed: int = 0, grad_accum: int = 1):
    """The single-process reference: the plain engine over the same models and schedules."""
    from ijepa_fast.engines.plain import PlainEngine
    from ijepa_fast.train.optim import build_optimizer
    from ijepa_fast.train.step import TrainStep

    student, target = models(cfg, seed)
    optimizer = build_optimizer(student, cfg.optim, torch.device("cpu"))
    engine = PlainEngine(student, target, optimizer, torch.device("cpu"), grad_clip=cfg.optim.grad_clip)
    return TrainStep(engine, schedules(cfg), autocast_dtype(cfg), grad_accum=grad_accum)


def deepspeed_step(
    cfg: Config, world: int, seed: int = 0, grad_accum: int = 1, device_type: str = "cpu", device: str = "cpu"
):
    """The same step over the DeepSpeed engine (ZeRO stage ``cfg.run.zero_stage``) on ``device``, with
    the DeepSpeed config generated for ``device_type`` (a GPU's config runs on the CPU too)."""
    from ijepa_fast.engines.deepspeed import DeepSpeedEngine, deepspeed_config
    from ijepa_fast.train.step import TrainStep

    ds_cfg = deepspeed_config(cfg, world, device_type=device_type, grad_accum=grad_accum)
    engine = DeepSpeedEngine(*models(cfg, seed), ds_cfg, torch.device(device))
    return TrainStep(engine, schedules(cfg), autocast_dtype(cfg), grad_accum=grad_accum)


def gpu_config(stage: int, batch: int = PER_RANK) -> Config:
    """The tiny run in bf16 autocast; with ``device_type="cuda"`` its DeepSpeed config is a GPU's."""
    cfg = tiny_config(stage)
    cfg.run.dtype, cfg.data.batch_size = "bf16", batch
    return cfg.validate()


def global_batch(step: int, world: int) -> tuple[torch.Tensor, MaskBatch]:
    """The step's global batch: images [PER_RANK*world, 3, 32, 32] and its masks."""
    n = PER_RANK * world
    g = torch.Generator().manual_seed(1000 + step)
    images = torch.randn(n, 3, IMG, IMG, generator=g)
    return images, MultiBlockMaskSampler(GRID, min_keep=2, seed=7)(n, step)


def local_batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, MaskBatch]:
    """This rank's rows of the global batch (masks split along the batch axis)."""
    images, masks = global_batch(step, world)
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    return images[rows], MaskBatch(masks.context[rows], masks.targets[:, rows])


# ----------------------------------------------------------------------------- scenarios


class _CountCollectives:
    """Counts calls of torch.distributed's collectives while active."""

    NAMES = (
        "all_gather_into_tensor",
        "all_gather",
        "all_reduce",
        "broadcast",
        "reduce_scatter_tensor",
        "all_to_all_single",
        "_all_gather_base",
    )

    def __enter__(self):
        self.count, self.saved = 0, {}
        for name in self.NAMES:
            fn = getattr(torch.distributed, name, None)
            if fn is None:
                continue
            self.saved[name] = fn

            def counted(*args, _fn=fn, **kwargs):
                self.count += 1
                return _fn(*args, **kwargs)

            setattr(torch.distributed, name, counted)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(torch.distributed, name, fn)
        return False


def run_stage(stage: int, out: Path, rank: int, world: int) -> None:
    from ijepa_fast.engines.deepspeed import list_tags

    cfg = tiny_config(stage)
    ckpt_dir = out / f"ds_zero{stage}"
    step_fn = deepspeed_step(cfg, world, 0)
    engine = step_fn.engine
    losses = []
    for i in range(STEPS):
        images, masks = local_batch(i, rank, world)
        out_i = step_fn(images, masks, i, monitor=i == MONITOR_AT)
        losses.append(out_i["loss"].item())
        if i == MONITOR_AT:  # every rank: its own batch's summary
            torch.save({k: v for k, v in out_i.items() if k != "loss"}, out / f"monitors_zero{stage}_rank{rank}.pt")
        if i + 1 == SAVE_AT:
            if rank == 0:  # a later step's save, killed half-way: its tag is newer, ``latest`` never named it
                unfinished = ckpt_dir / engine.tag(SAVE_AT + 6)
                unfinished.mkdir(parents=True)
                (unfinished / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04 half a file")
            engine.save_checkpoint(ckpt_dir, SAVE_AT, {"schedules": step_fn.schedules.state_dict()}, keep=1)
            tags_after_save = list_tags(ckpt_dir)
    final = engine.consolidated_state()
    exported = engine.export_consolidated(out / f"export_zero{stage}", STEPS, {"loss": losses[-1]})
    sizes = checkpoint_sizes(engine, ckpt_dir / engine.tag(SAVE_AT), exported) if rank == 0 else None

    ema_check = None
    if stage == 3:  # shard-local EMA against the EMA of the gathered tensors
        from ijepa_fast.kernels.ema import ema_update_
        from ijepa_fast.train.step import ema_update

        expected = {k: v.clone() for k, v in final["target_encoder"].items()}
        ema_update_(list(expected.values()), list(final["encoder"].values()), 0.75)
        with _CountCollectives() as counter:
            ema_update(*engine.ema_pairs(), 0.75)
        got = engine.consolidated_state()["target_encoder"]
        ema_check = {"expected": expected, "got": got, "collectives": counter.count}

    finite_before = bool(engine.weights_finite())
    if rank == 1:  # one NaN in rank 1's own copy (its partition under ZeRO-3): every rank must see it
        first = next(step_fn.student.encoder.parameters())
        with torch.no_grad():
            (first.ds_tensor if stage == 3 else first.data).view(-1)[0] = float("nan")
    finite_check = (finite_before, bool(engine.weights_finite()))

    resumed_fn = deepspeed_step(cfg, world, 123)  # other initial weights: everything must come from the checkpoint
    client = resumed_fn.engine.load_checkpoint(ckpt_dir)
    resumed = []
    for i in range(client["step"], STEPS):
        images, masks = local_batch(i, rank, world)
        resumed.append(resumed_fn(images, masks, i)["loss"].item())
    final_resumed = resumed_fn.engine.consolidated_state()
    if rank == 0:
        torch.save(
            {
                "losses": losses,
                "resumed": resumed,
                "resumed_from": client["step"],
                "final": final,
                "final_resumed": final_resumed,
                "exported": str(exported),
                "ema_check": ema_check,
                "finite_check": finite_check,
                "tags_after_save": tags_after_save,
                "sizes": sizes,
                "ds_config": engine.ds_config,
            },
            out / f"result_zero{stage}.pt",
        )


def run_accumulation(out: Path, rank: int, world: int) -> None:
    """ACCUM_STEPS optimizer steps of ACCUM micro-batches (micro-batch j of step i is batch ACCUM*i+j)."""
    cfg = tiny_config(ACCUM_STAGE)
    step_fn = deepspeed_step(cfg, world, 0, grad_accum=ACCUM)
    losses, stepped = [], []
    for i in range(ACCUM_STEPS):
        for j in range(ACCUM):
            images, masks = local_batch(ACCUM * i + j, rank, world)
            losses.append(step_fn(images, masks, i)["loss"].item())
            stepped.append(step_fn.stepped)
    final = step_fn.engine.consolidated_state()
    if rank == 0:
        torch.save(
            {"losses": losses, "stepped": stepped, "final": final, "ds_config": step_fn.engine.ds_config},
            out / "result_accum.pt",
        )


def run_bf16(stage: int, out: Path, rank: int, world: int) -> None:
    """STEPS steps with the GPU's DeepSpeed config in bf16 autocast: the op builds reached while
    building the engine, the host reads of the COUNTED steps after WARMUP, then one EMA update
    checked against the EMA of the gathered fp32 master weights (rank 0 writes
    ``result_bf16_{stage}.pt``)."""
    import ijepa_fast.kernels._dispatch as dispatch
    from ijepa_fast.kernels.ema import ema_update_
    from ijepa_fast.models.target_copy import Bf16TargetCopy
    from ijepa_fast.train.step import ema_update

    with _CountOpBuilds() as builds:
        step_fn = deepspeed_step(gpu_config(stage), world, device_type="cuda")
    engine = step_fn.engine
    if stage < 3:  # speed.bf16_target_copy, as train.build.train_step_for makes it (ZeRO-3 refuses it)
        step_fn.target_copy = Bf16TargetCopy(engine.target_encoder)
    batches = [local_batch(i, rank, world) for i in range(STEPS)]
    losses = [step_fn(*batches[i], i)["loss"] for i in range(WARMUP)]
    # The CPU reference of the fused gathers checks its indices on the host; the Triton kernels the GPU
    # runs check them only in debug mode. Left out here, so that the count is the GPU's.
    check_range, dispatch.check_range = dispatch.check_range, lambda *args, **kwargs: None
    try:
        with _CountHostReads() as reads:
            losses += [step_fn(*batches[i], i)["loss"] for i in range(WARMUP, STEPS)]
    finally:
        dispatch.check_range = check_range
    losses = [loss.item() for loss in losses]
    final = engine.consolidated_state()  # fp32 master weights (safe_get_full_fp32_param) and target
    copy_is_cast = None
    if step_fn.target_copy is not None:  # the copy the EMA wrote equals the cast of the fp32 target
        params = list(engine.target_encoder.parameters())
        pairs = [(p, c) for p, c in zip(params, step_fn.target_copy.outputs_for(params)) if c is not None]
        copy_is_cast = bool(pairs) and all(torch.equal(c, p.detach().to(torch.bfloat16)) for p, c in pairs)
    expected = {k: v.clone() for k, v in final["target_encoder"].items()}
    ema_update_(list(expected.values()), list(final["encoder"].values()), 0.75)
    ema_update(*engine.ema_pairs(), 0.75)
    got = engine.consolidated_state()["target_encoder"]
    if rank == 0:
        result = {
            "losses": losses,
            "final": final,
            "ema_expected": expected,
            "ema_got": got,
            "ds_config": engine.ds_config,
            "builds": builds.calls,
            "host_reads": reads.counts,
            "copy_is_cast": copy_is_cast,
        }
        torch.save(result, out / f"result_bf16_{stage}.pt")


def train_on_one_rank(stage: int, out: Path) -> None:
    """A world of one with the global batch of WORLD=2 ranks (batch 2 x PER_RANK): SAVE_AT steps, then a
    checkpoint in ``out/one_rank{stage}`` for a two-rank run to resume."""
    step_fn = deepspeed_step(tiny_config(stage, batch=2 * PER_RANK), 1)
    for i in range(SAVE_AT):
        step_fn(*global_batch(i, 2), i)
    step_fn.engine.save_checkpoint(out / f"one_rank{stage}", SAVE_AT, {"schedules": step_fn.schedules.state_dict()})


def resume_on_other_world(stage: int, ckpt_dir: Path, rank: int, world: int) -> dict:
    """Resume ``ckpt_dir`` (written by another number of ranks) and run steps SAVE_AT..STEPS-1 of the
    global batch of two ranks; returns the losses, the final state and the restored RNG check."""
    from ijepa_fast.engines.deepspeed import saved_world_size
    from ijepa_fast.io.checkpoint import load_file

    batch = 2 * PER_RANK // world
    step_fn = deepspeed_step(tiny_config(stage, batch=batch), world, seed=123)  # everything from the checkpoint
    client = step_fn.engine.load_checkpoint(ckpt_dir)
    tag_dir = ckpt_dir / step_fn.engine.tag(client["step"])
    saved_rng = load_file(tag_dir / f"ijepa_rank{rank % saved_world_size(tag_dir):05d}.pt")["rng"]["torch"]
    rng_restored = torch.equal(torch.get_rng_state(), saved_rng)
    losses = []
    for i in range(client["step"], STEPS):
        images, masks = global_batch(i, 2)
        rows = slice(rank * batch, (rank + 1) * batch)
        losses.append(step_fn(images[rows], MaskBatch(masks.context[rows], masks.targets[:, rows]), i)["loss"].item())
    return {
        "resumed_from": client["step"],
        "losses": losses,
        "final": step_fn.engine.consolidated_state(),
        "rng_restored": rng_restored,
        "engine": step_fn.engine,
    }


def run_from_two_ranks(out: Path, zero_out: Path) -> None:
    """Resume each stage's step-SAVE_AT checkpoint of ``zero`` on one rank (``result_from2_{stage}.pt``,
    with a consolidated export); then resume copies with a payload planted in a file only the
    conversion reads, and in a file of the universal checkpoint itself (``planted_universal.json``)."""
    from ijepa_fast.io.checkpoint import UntrustedCheckpointError
    from tests.payloads import plant

    for stage in FROM_TWO_STAGES:
        resumed = resume_on_other_world(stage, zero_out / f"ds_zero{stage}", 0, 1)
        resumed["exported"] = str(resumed.pop("engine").export_consolidated(out / f"export_from2_{stage}", STEPS))
        torch.save(resumed, out / f"result_from2_{stage}.pt")
    planted = []
    for stage in (1, 2, 3):  # ZeRO: the conversion runs
        for where in ("rank file", "universal file"):
            copy = out / f"planted_{stage}_{where.split()[0]}"
            shutil.copytree(zero_out / f"ds_zero{stage}", copy)
            tag_dir = copy / f"step_{SAVE_AT:08d}"
            engine = deepspeed_step(tiny_config(stage, batch=2 * PER_RANK), 1, seed=123).engine
            if where == "rank file":  # read by the conversion only
                path = next(tag_dir.glob("*rank_1*optim_states.pt"))
            else:  # converted first, as a resume killed after the conversion leaves it
                from ijepa_fast.engines.deepspeed import convert_to_universal

                universal = copy / "universal" / tag_dir.name
                convert_to_universal(tag_dir, universal, stage)
                path = universal / "zero" / "encoder.blocks.0.attn.qkv.weight" / "exp_avg.pt"
            marker = out / f"ran_{stage}_{where.split()[0]}"
            plant(path, marker)
            try:
                engine.load_checkpoint(copy)
                error = ""
            except UntrustedCheckpointError as err:
                error = str(err)
            planted.append({"stage": stage, "where": where, "file": str(path), "marker": str(marker), "error": error})
    (out / "planted_universal.json").write_text(json.dumps(planted, indent=1))


SINGLE_TIMEOUT_S = 42.0  # the world-of-one run's collective timeout: a value no library picks by default


def group_timeouts() -> list[float]:
    """The collective timeout of every process group of this process, in seconds."""
    from torch.distributed import distributed_c10d as c10d

    return [pg._get_backend(torch.device("cpu")).options._timeout.total_seconds() for pg in c10d._world.pg_map]


def run_single(out: Path) -> None:
    """ZeRO 0-3 in a world of one: save after one step; resume the clean checkpoint; then, for each
    file of it, resume a copy with a payload planted in that file. Writes ``OUT_DIR/single.json``."""
    from ijepa_fast.io.checkpoint import UntrustedCheckpointError
    from tests.payloads import plant

    report: dict = {"planted": [], "clean_resume": {}, "exports": {}, "full_disk": {}, "sizes": {}, "background": {}}
    for stage in (0, 1, 2, 3):
        cfg = tiny_config(stage)
        build = partial(deepspeed_step, cfg, 1)
        step_fn = build(0)
        step_fn(*local_batch(0, 0, 1), 0)
        tag_dir = step_fn.engine.save_checkpoint(out / f"single{stage}", 1)
        report["full_disk"][stage] = save_on_a_full_disk(step_fn.engine, build, out / f"full{stage}")
        report["exports"][stage] = str(step_fn.engine.export_consolidated(out / f"export{stage}", 1))
        report["sizes"][stage] = checkpoint_sizes(step_fn.engine, tag_dir, report["exports"][stage])
        report["background"][stage] = background_against_in_step(step_fn, out / f"background{stage}")
        report["clean_resume"][stage] = build(1).engine.load_checkpoint(out / f"single{stage}")["step"]
        for path in sorted(tag_dir.glob("*.pt")):
            copy = out / f"planted{stage}_{path.stem}"
            shutil.copytree(tag_dir.parent, copy)
            marker = out / f"ran{stage}_{path.stem}"
            planted = copy / tag_dir.name / path.name
            plant(planted, marker)
            try:
                build(1).engine.load_checkpoint(copy)
                error = ""
            except UntrustedCheckpointError as err:
                error = str(err)
            report["planted"].append({"stage": stage, "file": str(planted), "marker": str(marker), "error": error})
    report["group_timeouts"] = group_timeouts()
    report["compile"] = compile_counts()
    for stage in FROM_ONE_STAGES:
        train_on_one_rank(stage, out)
    (out / "single.json").write_text(json.dumps(report, indent=1))


def background_against_in_step(step_fn, folder: Path) -> dict:
    """Background saves at steps 1 and 2 (a training step between: the second reuses the first's
    host buffers), then a save in the step at step 2 into another folder: which files of the two
    step-2 checkpoints differ (every tensor bit for bit, every other value by ``==``), and whether
    the second background save copied into the first one's buffers."""
    from ijepa_fast.io.checkpoint import checkpoint_name

    engine, meta = step_fn.engine, {"loss": 0.0}

    def staged_buffers() -> set[int]:
        return {t.data_ptr() for t in _tensors(engine._staged)}

    _, write = engine.save_async(folder / "background", 1, meta, keep=2)
    write()
    first = staged_buffers()
    step_fn(*local_batch(1, 0, 1), 1)
    _, write = engine.save_async(folder / "background", 2, meta, keep=2)
    write()
    reused = staged_buffers() == first
    engine.save(folder / "in_step", 2, meta, keep=2)
    tag = engine.tag(2)
    names = sorted(p.name for p in (folder / "in_step" / "deepspeed" / tag).iterdir())
    pairs = [(f"deepspeed/{tag}/{name}", name) for name in names] + [(f"checkpoints/{checkpoint_name(2)}", "export")]
    differ = {}
    for rel, label in pairs:
        loaded = [torch.load(folder / kind / rel, weights_only=False) for kind in ("background", "in_step")]
        where = _first_difference(*loaded)
        if where is not None:
            differ[label] = where
    return {"files": len(pairs), "differ": differ, "reused_buffers": reused, "buffers": len(first)}


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []


def _first_difference(a, b, where: str = "") -> str | None:
    """Where ``a`` and ``b`` first differ (tensors bit for bit, other values by ``==``); None if nowhere."""
    if isinstance(a, torch.Tensor):
        same = (
            isinstance(b, torch.Tensor) and (a.dtype, a.shape) == (b.dtype, b.shape) and torch.equal(_bits(a), _bits(b))
        )
    elif isinstance(a, dict):
        if not isinstance(b, dict) or a.keys() != b.keys():
            return where or "/"
        return next((d for k in a if (d := _first_difference(a[k], b[k], f"{where}/{k}")) is not None), None)
    elif isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return where or "/"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := _first_difference(x, y, f"{where}/{i}"))), None)
    elif type(a) is type(b) and hasattr(a, "__dict__") and type(a).__eq__ is object.__eq__:
        return _first_difference(vars(a), vars(b), where)  # an object (DeepSpeed's loss scaler): its fields
    else:
        same = a == b
    return None if same else (where or "/")


def checkpoint_sizes(engine, tag_dir: Path, export: str | Path) -> dict:
    """The engine's estimate of one checkpoint against what one took: the tag folder (every rank's
    files) and the consolidated export."""
    on_disk = sum(f.stat().st_size for f in tag_dir.iterdir()) + Path(export).stat().st_size
    return {"estimate": engine.checkpoint_bytes(), "on_disk": on_disk}


def save_on_a_full_disk(engine, build, save_dir: Path) -> dict:
    """Save step 1, then step 2 with the kernel refusing to grow any file past half the size of step
    1's model states (RLIMIT_FSIZE: the write fails with EFBIG, in C++ writers too): what the save
    raised, what the failed tag's folder holds, and the step a resume then restores."""
    import resource
    import signal

    from ijepa_fast.engines.deepspeed import latest_step

    engine.save_checkpoint(save_dir, 1)
    limit = min(p.stat().st_size for p in (save_dir / engine.tag(1)).glob("*model_states.pt")) // 2
    report: dict = {"error": None, "failed_tag": str(save_dir / engine.tag(2))}
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        engine.save_checkpoint(save_dir, 2)
    except Exception as err:
        report["error"] = {"type": type(err).__name__, "errno": getattr(err, "errno", None)}
        report["error"]["filename"] = getattr(err, "filename", None)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    failed = Path(report["failed_tag"])
    report["left_in_failed_tag"] = sorted(p.name for p in failed.iterdir()) if failed.is_dir() else []
    report["latest"] = latest_step(save_dir)
    report["resumed_step"] = build(1).engine.load_checkpoint(save_dir)["step"]
    return report


class _CountOpBuilds:
    """Records every DeepSpeed op builder's ``load`` / ``jit_load`` (and torch's JIT extension build)
    called while active, by builder class name, without building anything."""

    def __enter__(self):
        import torch.utils.cpp_extension as cpp
        from deepspeed.accelerator import get_accelerator
        from deepspeed.ops.op_builder.builder import OpBuilder

        get_accelerator().create_op_builder("FusedAdamBuilder")  # imports this accelerator's builders
        self.calls, self.saved = [], []
        classes, todo = [], [OpBuilder]
        while todo:
            cls = todo.pop()
            classes.append(cls)
            todo.extend(cls.__subclasses__())
        for cls in classes:
            for name in ("load", "jit_load"):
                if name in vars(cls):
                    self._patch(cls, name, f"{cls.__name__}.{name}")
        self._patch(cpp, "load", "torch.utils.cpp_extension.load")
        return self

    def _patch(self, owner, name: str, label: str) -> None:
        self.saved.append((owner, name, getattr(owner, name)))

        def refused(*args, **kwargs):
            self.calls.append(label)
            raise RuntimeError(f"{label}: an op build")

        setattr(owner, name, refused)

    def __exit__(self, *exc):
        for owner, name, fn in reversed(self.saved):
            setattr(owner, name, fn)
        return False


HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")
WARMUP, COUNTED = 2, STEPS - 2  # ZeRO-3 records its parameter trace over the first two steps


class _CountHostReads:
    """Counts calls of the Tensor methods that read a device tensor to the host, while active."""

    def __enter__(self):
        self.counts, self.saved = {}, {}
        for name in HOST_READS:
            fn = getattr(torch.Tensor, name)
            self.saved[name] = fn

            def counted(t, *args, _fn=fn, _name=name, **kwargs):
                self.counts[_name] = self.counts.get(_name, 0) + 1
                return _fn(t, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(torch.Tensor, name, fn)
        return False


def on_gpu() -> dict:
    """One GPU, ZeRO 0-3 with the generated GPU config (bf16 autocast, torch's fused AdamW): the op
    builds reached while building each engine, and whatever CUDA reports when COUNTED steps after
    WARMUP run under ``torch.cuda.set_sync_debug_mode("error")`` (an empty string: no sync)."""
    report: dict = {"builds": {}, "syncs": {}, "losses": {}}
    for stage in (0, 1, 2, 3):
        with _CountOpBuilds() as builds:
            step_fn = deepspeed_step(gpu_config(stage), 1, device_type="cuda", device="cuda")
        report["builds"][stage] = builds.calls
        batches = [(x.cuda(), m.to("cuda")) for x, m in (local_batch(i, 0, 1) for i in range(WARMUP + COUNTED))]
        for i in range(WARMUP):
            step_fn(*batches[i], i)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            losses = [step_fn(*batches[i], i)["loss"] for i in range(WARMUP, WARMUP + COUNTED)]
            report["syncs"][stage] = ""
        except RuntimeError as err:
            losses, report["syncs"][stage] = [], str(err).splitlines()[0]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        report["losses"][stage] = [loss.item() for loss in losses]
    return report


def compile_counts() -> dict:
    """speed.compile=on at ZeRO 0-3, built as the trainer builds it, with a backend that counts the
    graphs it is given: graphs and graph breaks in the first step, graphs compiled after it
    (recompiles), and whether compile was on."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from ijepa_fast.train.build import build_engine, models_for_run, train_step_for

    graphs = [0]

    def counting_backend(gm, example_inputs):
        graphs[0] += 1
        return gm.forward

    real_compile = torch.compile
    torch.compile = lambda *args, **kwargs: real_compile(*args, **{**kwargs, "backend": counting_backend})
    report = {}
    try:
        for stage in (0, 1, 2, 3):
            torch._dynamo.reset()
            counters.clear()
            graphs[0] = 0
            cfg = tiny_config(stage)
            cfg.run.engine, cfg.speed.compile = "deepspeed", "on"
            device = torch.device("cpu")
            engine = build_engine(cfg, *models_for_run(cfg, device, 1), device, 1)
            step_fn = train_step_for(cfg, engine, STEPS_PER_EPOCH)
            first = None
            for i in range(WARMUP + COUNTED):
                step_fn(*local_batch(i, 0, 1), i)
                if i == 0:
                    first = (graphs[0], sum(counters["graph_break"].values()))
            report[stage] = {
                "graphs": first[0],
                "breaks": sum(counters["graph_break"].values()),
                "recompiles": graphs[0] - first[0],
            }
    finally:
        torch.compile = real_compile
    return report


def run_on_locked_folder(overrides: list[str]) -> int:
    """Build a trainer (run.engine=deepspeed) on a run folder whose lock another process holds:
    every rank must stop with a RunFolderError (exit 5), none may wait for the others, and each must
    have left the process group (exit 6 if not: its teardown at exit could abort the process)."""
    from ijepa_fast import config as config_mod
    from ijepa_fast.train.run_folder import RunFolderError
    from ijepa_fast.train.trainer import Trainer

    try:
        Trainer(config_mod.load(None, overrides))
    except RunFolderError as err:
        print(f"refused: {err}", flush=True)
        return 6 if torch.distributed.is_initialized() else 5
    return 0


def run_on_a_small_disk(overrides: list[str]) -> int:
    """Build a trainer (run.engine=deepspeed) whose disk has 1 kB free: rank 0 must refuse the run
    before step 0 (an InsufficientSpaceError), rank 1 must stop too, and each must have left the
    process group (exit 8; exit 6 if the group is still up, exit 0 if the trainer was built)."""
    from collections import namedtuple

    from ijepa_fast import config as config_mod
    from ijepa_fast.io import async_save
    from ijepa_fast.train.run_folder import RunFolderError
    from ijepa_fast.train.trainer import Trainer

    usage = namedtuple("usage", "total used free")
    async_save.shutil.disk_usage = lambda path: usage(10_000, 9_000, 1_000)
    try:
        Trainer(config_mod.load(None, overrides))
    except (async_save.InsufficientSpaceError, RunFolderError) as err:
        print(f"refused: {type(err).__name__}: {err}", flush=True)
        return 6 if torch.distributed.is_initialized() else 8
    return 0


def run_with_a_hung_background_write(overrides: list[str]) -> int:
    """Train (run.engine=deepspeed, a checkpoint every 2 steps, written in the background) with the
    writes of step 4's checkpoint hanging half-written: each rank prints ``hung`` and waits there
    for the test's kill -9 (exit 9 if the save did not go to the background)."""
    from ijepa_fast import config as config_mod
    from ijepa_fast.engines.deepspeed import background
    from ijepa_fast.train.trainer import Trainer

    real = background._write

    def hang_at_step_4(state, path):
        if "step_00000004" not in str(path):
            return real(state, path)
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_bytes(b"half a checkpoint")
        print("hung", flush=True)
        time.sleep(600)

    background._write = hang_at_step_4
    trainer = Trainer(config_mod.load(None, overrides))
    if not trainer.saver.background:
        return 9
    trainer.fit()
    return 0


def run_with_a_nan_on_rank_1(overrides: list[str]) -> int:
    """Train (run.engine=deepspeed) with rank 1's loss NaN from the first step: every rank must stop
    with a NonFiniteLossError at step 1 (the loss is averaged over ranks), and leave the process
    group (exit 7; exit 6 if the group is still up, exit 0 if training went on)."""
    from ijepa_fast import config as config_mod
    from ijepa_fast.train.trainer import NonFiniteLossError, Trainer

    trainer = Trainer(config_mod.load(None, overrides))
    if trainer.rank == 1:
        forward = trainer.step_fn.student.forward
        trainer.step_fn.student.forward = lambda *args, **kwargs: forward(*args, **kwargs) * float("nan")
    try:
        trainer.fit()
    except NonFiniteLossError as err:
        print(f"stopped: {err}", flush=True)
        return 6 if torch.distributed.is_initialized() else 7
    return 0


class _BeforeEachStep:
    """The trainer's step with ``before(step)`` called first (the 0-based step index)."""

    def __init__(self, step_fn, before):
        self.step_fn, self.before = step_fn, before

    def __call__(self, images, masks, step, **options):
        self.before(step)
        return self.step_fn(images, masks, step, **options)

    def __getattr__(self, name):
        return getattr(self.step_fn, name)


def _optimizer_tensors(engine) -> list[torch.Tensor]:
    """What this rank's torch AdamW updates: its parameters (the module's at stage 0, the flat fp32
    partitions under ZeRO) and its state (moments, step counts), copied."""
    inner = engine._torch_optimizer
    params = [p for group in inner.param_groups for p in group["params"]]
    state = [v for p in params for v in inner.state[p].values() if torch.is_tensor(v)]
    return [t.detach().clone() for t in params + state]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).contiguous().view(torch.uint8)


def run_with_a_nan_on_rank_1_after(bad_step: int, out: Path, overrides: list[str]) -> int:
    """Train (run.engine=deepspeed) with rank 1's loss NaN from step index ``bad_step`` on: every
    rank must stop at the next log naming step bad_step + 1 (exit 7, as ``nan``), having skipped the
    bad steps on the device. Each rank writes ``nan_after_rank{rank}.json``: whether its AdamW's
    parameters and state kept their bits from before the bad step, and on rank 0 whether the export
    saved on the stop equals the consolidated weights and target encoder from before it."""
    from ijepa_fast import config as config_mod
    from ijepa_fast.io.checkpoint import list_checkpoints
    from ijepa_fast.train.trainer import NonFiniteLossError, Trainer

    trainer = Trainer(config_mod.load(None, overrides))
    engine, forward = trainer.engine, trainer.step_fn.student.forward
    current, before = {"step": 0}, {}

    def poisoned(*args, **kwargs):
        loss = forward(*args, **kwargs)
        return loss * float("nan") if trainer.rank == 1 and current["step"] >= bad_step else loss

    def snapshot(step: int) -> None:
        current["step"] = step
        if step == bad_step:
            before.update(optimizer=_optimizer_tensors(engine), weights=engine.consolidated_state())

    trainer.step_fn.student.forward = poisoned
    trainer.step_fn = _BeforeEachStep(trainer.step_fn, snapshot)
    try:
        trainer.fit()
    except NonFiniteLossError as err:
        print(f"stopped: {err}", flush=True)
        report = {
            "steps_run": current["step"] + 1,
            "optimizer_unchanged": all(
                torch.equal(_bits(a), _bits(b)) for a, b in zip(_optimizer_tensors(engine), before["optimizer"])
            ),
        }
        if trainer.rank == 0:
            steps, path = list_checkpoints(Path(trainer.run_dir) / "checkpoints")[-1]
            saved = torch.load(path, weights_only=True)
            report["export_step"] = steps
            report["export_matches"] = all(
                torch.equal(_bits(saved[part][k]), _bits(v))
                for part, sd in before["weights"].items()
                for k, v in sd.items()
            )
        (out / f"nan_after_rank{trainer.rank}.json").write_text(json.dumps(report))
        return 6 if torch.distributed.is_initialized() else 7
    return 0


def main(argv: list[str]) -> int:
    mode, out = argv[0], Path(argv[1])
    from ijepa_fast.runtime import distributed as dist_

    if mode == "locked":
        return run_on_locked_folder(argv[2:])
    if mode == "small_disk":
        # The refusal and the group left are what is checked: exit without the interpreter's
        # teardown, in which DeepSpeed's communication threads once aborted the process (SIGABRT,
        # "terminate called without an active exception") after the group had been destroyed.
        code = run_on_a_small_disk(argv[2:])
        sys.stdout.flush()
        os._exit(code)
    if mode == "hung_write":
        return run_with_a_hung_background_write(argv[2:])
    if mode == "nan":
        return run_with_a_nan_on_rank_1(argv[2:])
    if mode == "nan_after":
        return run_with_a_nan_on_rank_1_after(int(argv[2]), out, argv[3:])
    if mode == "zero":
        env = dist_.init(deepspeed=True, timeout_s=120)
        for stage in (int(s) for s in argv[2].split(",")):
            run_stage(stage, out, env.rank, env.world_size)
        run_accumulation(out, env.rank, env.world_size)
        for stage in (0, 1, 2, 3):
            run_bf16(stage, out, env.rank, env.world_size)
        for stage in FROM_ONE_STAGES:  # the checkpoints a world of one wrote (``single``)
            resumed = resume_on_other_world(stage, Path(argv[3]) / f"one_rank{stage}", env.rank, env.world_size)
            if env.rank == 0:
                torch.save({k: v for k, v in resumed.items() if k != "engine"}, out / f"result_from1_{stage}.pt")
        dist_.barrier()
        dist_.cleanup()
        return 0
    if mode == "gpu":
        dist_.init(deepspeed=True, timeout_s=120, device=torch.device("cuda", 0))
        (out / "gpu.json").write_text(json.dumps(on_gpu(), indent=1))
        dist_.cleanup()
        return 0
    if mode == "from2":  # a world of one resumes the two-rank checkpoints of ``zero`` (argv[2])
        dist_.init(deepspeed=True, timeout_s=120)
        run_from_two_ranks(out, Path(argv[2]))
        dist_.cleanup()
        return 0
    if mode == "single":
        dist_.init(deepspeed=True, timeout_s=SINGLE_TIMEOUT_S)
        run_single(out)
        dist_.cleanup()
        return 0
    env = dist_.init(timeout_s=float(os.environ.get("IJEPA_DIST_TIMEOUT_S", 5)))
    t = torch.ones(1)
    torch.distributed.all_reduce(t)  # everyone is up
    if env.rank == 1:  # "die"
        os._exit(3)  # a crash: no clean-up, sockets closed by the OS
    started = time.perf_counter()
    try:
        torch.distributed.all_reduce(t)
    except Exception as err:  # the point: an error, not a hang
        print(
            f"rank 0: collective failed after {time.perf_counter() - started:.1f} s: {type(err).__name__}: {err}",
            file=sys.stderr,
            flush=True,
        )
        os._exit(17)  # the peer is gone: no orderly destroy_process_group
    print("rank 0: the collective finished although a peer is gone", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
