"""DeepSpeed ZeRO engine on CPU (gloo, ``DS_ACCELERATOR=cpu``), two processes.

ZeRO stages 1, 2 and 3 against the single-process plain ``TrainStep`` on the same global batch
and masks: per-step losses, the trained weights and the target encoder after five steps; a resume
from the step-3 checkpoint matches the uninterrupted run bitwise; the consolidated fp32 export
loads without DeepSpeed; the stage-3 shard-local EMA equals the EMA of the gathered tensors and
makes no collective call; the checkpoint size the disk-space check expects is what a save
writes; a NaN on one rank makes ``weights_finite`` false on every rank; an
unfinished tag of a later step does not displace the one just saved; every rank measures the
collapse monitors on its own batch. Plus the generated config,
conflicting user configs, the launcher environment, the launch scripts (dry run), a dead or stalled
rank failing its peer in time, and a locked run folder stopping every rank.

The two-process runs are one launch of ``tests/ds_worker.py`` for all three stages (each process
pays ~10 s of imports); the first DeepSpeed run on a machine also JIT-builds its shared-memory
communication op (~35 s, cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ijepa_fast.config import ConfigError
from ijepa_fast.engines import resolve_engine
from ijepa_fast.runtime import distributed as dist_
from ijepa_fast.runtime.optional import available
from tests import ds_worker as W

pytestmark = pytest.mark.deepspeed
needs_ds = pytest.mark.skipif(
    not available("deepspeed"), reason="deepspeed is not installed (pip install 'deepspeed==0.19.8')"
)

REPO = Path(__file__).resolve().parents[1]
WORLD = 2
STAGES = (1, 2, 3)
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)  # fp32; measured differences ~1e-7 (rank halves + all-reduce order)
WEIGHT_TOL = dict(rtol=1e-4, atol=1e-5)  # measured max |diff| 2.3e-7 after five AdamW steps
MONITOR_TOL = dict(rtol=1e-4, atol=1e-4)  # the features' Gram matrix: measured max |diff| 2.3e-5, entries to 272


def start_ranks(argv: list[str], out: Path, name: str, extra_env: dict | None = None, world: int = WORLD):
    """Start ``world`` processes of ``argv`` as torchrun would (env vars), each logging to
    ``out/{name}_rank{r}.log``; return (processes, open log files)."""
    port = dist_.free_port()
    procs, logs = [], []
    for rank in range(world):
        env = {
            **os.environ,
            "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1",
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "PYTHONPATH": str(REPO),
            **(extra_env or {}),
        }
        log = open(out / f"{name}_rank{rank}.log", "w+")  # noqa: SIM115 (closed by the caller)
        logs.append(log)
        procs.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs, logs


def _stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()  # SIGKILL ends a stopped process too
            p.wait()


def _read_and_close(logs) -> list[str]:
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    return texts


def launch(mode: str, out: Path, *args: str, timeout: float = 300, extra_env: dict | None = None, world: int = WORLD):
    """Start ``world`` ranks of ds_worker.py; wait; return (codes, logs, seconds)."""
    started = time.perf_counter()
    argv = [sys.executable, str(REPO / "tests" / "ds_worker.py"), mode, str(out), *args]
    procs, logs = start_ranks(argv, out, mode, extra_env, world)
    codes = []
    try:
        for p in procs:
            remaining = max(1.0, timeout - (time.perf_counter() - started))
            codes.append(p.wait(timeout=remaining))
    finally:
        _stop_all(procs)
    return codes, _read_and_close(logs), time.perf_counter() - started


def _tail(texts: list[str], n: int = 3000) -> str:
    return "\n".join(f"--- rank {r} ---\n{t[-n:]}" for r, t in enumerate(texts))


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory, single_rank) -> dict:
    """ds_worker.py ``zero`` on two ranks: fp32 runs of ZeRO 1-3 (``runs[stage]``), gradient
    accumulation, bf16 runs of ZeRO 0-3 with the GPU's config (``runs["bf16"][stage]``: also the op
    builds and host reads counted on rank 0), and the resumes of the checkpoints a world of one
    wrote (``runs["from1"][stage]``)."""
    out = tmp_path_factory.mktemp("zero")
    codes, texts, _ = launch("zero", out, ",".join(map(str, STAGES)), str(single_rank["folder"]), timeout=600)
    assert codes == [0] * WORLD, _tail(texts)
    runs = {s: torch.load(out / f"result_zero{s}.pt", weights_only=False) for s in STAGES}
    for s in STAGES:
        runs[s]["monitors"] = [torch.load(out / f"monitors_zero{s}_rank{r}.pt") for r in range(WORLD)]
    runs["accum"] = torch.load(out / "result_accum.pt", weights_only=False)
    runs["bf16"] = {s: torch.load(out / f"result_bf16_{s}.pt", weights_only=False) for s in range(4)}
    runs["from1"] = {s: torch.load(out / f"result_from1_{s}.pt", weights_only=False) for s in W.FROM_ONE_STAGES}
    runs["folder"] = out
    return runs


@pytest.fixture(scope="module")
def from_two_ranks(tmp_path_factory, zero_runs) -> dict:
    """ds_worker.py ``from2``: a world of one resumes the two-rank step-3 checkpoints of ``zero_runs``
    (one more process, ~1 min on 2 cores: its tests are ``slow``; the weights-only reads it covers
    end to end are tested alone in ``test_deepspeeds_reads_during_a_resharded_load_are_weights_only``)."""
    out = tmp_path_factory.mktemp("from2")
    codes, texts, _ = launch("from2", out, str(zero_runs["folder"]), timeout=400, world=1)
    assert codes == [0], _tail(texts)
    runs = {s: torch.load(out / f"result_from2_{s}.pt", weights_only=False) for s in W.FROM_TWO_STAGES}
    runs["planted"] = json.loads((out / "planted_universal.json").read_text())
    return runs


def _plain_run(cfg) -> dict:
    """The single-process plain step on the global batches (both ranks' halves together)."""
    step = W.plain_step(cfg)
    student, target = step.student, step.target_encoder
    losses = []
    for i in range(W.STEPS):
        images, masks = W.global_batch(i, WORLD)
        out = step(images, masks, i, monitor=i == W.MONITOR_AT)
        losses.append(out["loss"].item())
        if i == W.MONITOR_AT:
            monitors = {k: v for k, v in out.items() if k != "loss"}
    return {
        "losses": losses,
        "monitors": monitors,
        "encoder": student.encoder.state_dict(),
        "predictor": student.predictor.state_dict(),
        "target_encoder": target.state_dict(),
    }


@pytest.fixture(scope="module")
def plain_run() -> dict:
    return _plain_run(W.tiny_config())


@pytest.fixture(scope="module")
def plain_bf16_run() -> dict:
    return _plain_run(W.gpu_config(1))


def _assert_states_close(got: dict, want: dict, **tol) -> None:
    for part in ("encoder", "predictor", "target_encoder"):
        assert got[part].keys() == want[part].keys(), part
        for name, value in want[part].items():
            torch.testing.assert_close(got[part][name], value, **tol, msg=lambda m, n=f"{part}.{name}": f"{n}: {m}")


# ----------------------------------------------------------------------------- two processes


@needs_ds
@pytest.mark.parametrize("stage", STAGES)
def test_zero_matches_the_plain_step_on_the_global_batch(stage, zero_runs, plain_run):
    run = zero_runs[stage]
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(plain_run["losses"]), **LOSS_TOL)
    _assert_states_close(run["final"], plain_run, **WEIGHT_TOL)
    assert run["ds_config"]["zero_optimization"]["stage"] == stage
    assert run["ds_config"]["train_batch_size"] == W.PER_RANK * WORLD


@needs_ds
@pytest.mark.parametrize("stage", STAGES)
def test_every_rank_measures_the_collapse_monitors_on_its_own_batch(stage, zero_runs, plain_run):
    """Each rank's Gram matrix is its local tokens' Z^T Z: the ranks' add up to the plain step's on
    the global batch (its tokens are the ranks' tokens, stacked)."""
    from ijepa_fast.train.metrics import rankme_from_gram

    ranks, whole = zero_runs[stage]["monitors"], plain_run["monitors"]
    for monitors in ranks:
        assert monitors["feature_gram"].dtype == torch.float64
        assert 0 < float(monitors["feature_std_min"]) <= float(monitors["feature_std"])
        assert 1 < float(rankme_from_gram(monitors["feature_gram"])) <= monitors["feature_gram"].shape[0]
    summed = sum(monitors["feature_gram"] for monitors in ranks)
    torch.testing.assert_close(summed, whole["feature_gram"], **MONITOR_TOL)
    assert float(rankme_from_gram(summed)) == pytest.approx(float(rankme_from_gram(whole["feature_gram"])), rel=1e-4)


@needs_ds
def test_gradient_accumulation_under_zero_matches_the_plain_step(zero_runs):
    """Two ranks, ZeRO-2, two micro-batches a step against one process accumulating the same two
    global micro-batches: same per-micro-batch losses, same weights after three optimizer steps."""
    run = zero_runs["accum"]
    step = W.plain_step(W.tiny_config(), grad_accum=W.ACCUM)
    student, target = step.student, step.target_encoder
    losses, stepped = [], []
    for i in range(W.ACCUM_STEPS):
        for j in range(W.ACCUM):
            losses.append(step(*W.global_batch(W.ACCUM * i + j, WORLD), i)["loss"].item())
            stepped.append(step.stepped)
    assert run["stepped"] == stepped == [False, True] * W.ACCUM_STEPS
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(losses), **LOSS_TOL)
    want = {
        "encoder": student.encoder.state_dict(),
        "predictor": student.predictor.state_dict(),
        "target_encoder": target.state_dict(),
    }
    _assert_states_close(run["final"], want, **WEIGHT_TOL)
    assert run["ds_config"]["gradient_accumulation_steps"] == W.ACCUM
    assert run["ds_config"]["train_batch_size"] == W.PER_RANK * WORLD * W.ACCUM


@needs_ds
@pytest.mark.parametrize("stage", STAGES)
def test_resume_from_step_3_matches_the_uninterrupted_run(stage, zero_runs):
    run = zero_runs[stage]
    assert run["resumed_from"] == W.SAVE_AT
    assert run["resumed"] == run["losses"][W.SAVE_AT :]  # bitwise: same world size, same partitions
    _assert_states_close(run["final_resumed"], run["final"], rtol=0, atol=0)


@needs_ds
@pytest.mark.parametrize("stage", STAGES)
def test_consolidated_export_loads_without_deepspeed(stage, zero_runs):
    from ijepa_fast.models.ijepa import build_models

    run = zero_runs[stage]
    state = torch.load(run["exported"], map_location="cpu", weights_only=True)
    assert state["step"] == W.STEPS and state["engine"] == "deepspeed" and state["world_size"] == WORLD
    _assert_states_close(state, run["final"], rtol=0, atol=0)
    student, target = build_models(W.tiny_config().model, W.IMG)
    for module, key in ((student.encoder, "encoder"), (student.predictor, "predictor"), (target, "target_encoder")):
        module.load_state_dict(state[key])  # strict: plain names, no "module." prefix, full fp32 shapes
        assert all(v.dtype == torch.float32 for v in state[key].values())


# 5 %, not looser: leaving out its smallest part (the target encoder, 14-16 % of a checkpoint here) must fail
SIZE_TOL = 0.05


@needs_ds
@pytest.mark.parametrize("stage", STAGES)
def test_the_checkpoint_size_estimate_matches_what_two_ranks_wrote(stage, zero_runs):
    """The disk-space check's estimate of one checkpoint against the tag folder (both ranks' files)
    and the consolidated export a save wrote."""
    sizes = zero_runs[stage]["sizes"]
    assert sizes["estimate"] == pytest.approx(sizes["on_disk"], rel=SIZE_TOL)


@needs_ds
def test_zero3_shard_local_ema_equals_the_full_ema_without_collectives(zero_runs):
    check = zero_runs[3]["ema_check"]
    assert check["collectives"] == 0
    for name, want in check["expected"].items():
        torch.testing.assert_close(check["got"][name], want, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


def _relative_distance(got: dict, want: dict, start: dict) -> float:
    """||got - want|| / ||want - start|| over every tensor of the state dicts: how far apart two
    trained states are, as a fraction of how far training moved the weights."""
    apart = sum(((got[k].float() - want[k].float()) ** 2).sum() for k in want)
    moved = sum(((want[k].float() - start[k].float()) ** 2).sum() for k in want)
    return float((apart / moved).sqrt())


@needs_ds
@pytest.mark.parametrize("stage", (0, 1, 2, 3))
def test_bf16_zero_agrees_with_the_plain_bf16_step_within_bf16s_own_error(stage, zero_runs, plain_run, plain_bf16_run):
    """Two ranks, the GPU's config, bf16 autocast, five steps, against the single-process plain step.

    The bound: both run the same bf16-autocast computation on fp32 weights and differ only in how
    the fp32 gradients are summed (another order: ~1e-7 relative), far below bf16's own rounding
    (2^-9). So the engine must lie closer to the plain bf16 step than that step lies to fp32:
    - weights: by less than the plain bf16 weights' distance from the fp32 weights (relative L2:
      Adam's first steps turn a near-zero gradient's rounding into a whole step for a few elements,
      which a max-norm would report and an L2 over all weights does not);
    - losses: two bf16 evaluations differ by at most twice the plain bf16 loss's largest distance
      from the fp32 loss; after step 0, or bf16's relative precision (2^-8) of the loss where that
      distance happens to be smaller: the Adam steps above move later losses by that much without
      the bf16 loss moving away from the fp32 one."""
    run = zero_runs["bf16"][stage]
    assert run["ds_config"]["bf16"]["enabled"] is False and run["ds_config"]["communication_data_type"] == "fp32"
    bf16_error = max(abs(a - b) for a, b in zip(plain_bf16_run["losses"], plain_run["losses"]))
    for step, (got, want) in enumerate(zip(run["losses"], plain_bf16_run["losses"])):
        bound = max(2 * bf16_error, 2**-8 * abs(want)) if step else 2 * bf16_error  # no Adam step yet at 0
        assert abs(got - want) <= bound, (run["losses"], plain_bf16_run["losses"], bf16_error)
    student, target = W.models(W.tiny_config())
    start = {"encoder": student.encoder.state_dict(), "predictor": student.predictor.state_dict()}
    start["target_encoder"] = target.state_dict()
    for part in ("encoder", "predictor", "target_encoder"):
        bound = _relative_distance(plain_bf16_run[part], plain_run[part], start[part])
        assert _relative_distance(run["final"][part], plain_bf16_run[part], start[part]) < bound, part


@needs_ds
@pytest.mark.parametrize("stage", (0, 1, 2, 3))
def test_bf16_ema_averages_the_fp32_master_weights(stage, zero_runs):
    """After five bf16 steps, one EMA update through ``ema_pairs`` equals the EMA of the gathered
    target with the optimizer's fp32 master weights (``safe_get_full_fp32_param``), exactly."""
    run = zero_runs["bf16"][stage]
    for name, want in run["ema_expected"].items():
        torch.testing.assert_close(run["ema_got"][name], want, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


@needs_ds
@pytest.mark.parametrize("stage", (0, 1, 2))
def test_bf16_target_copy_under_zero_is_the_cast_of_the_fp32_target(stage, zero_runs):
    """ZeRO 0-2 keep the whole target on each rank: after five bf16 steps whose EMA wrote the copy
    (speed.bf16_target_copy), it equals the cast of the fp32 target weights bit for bit (and the
    losses above, read through it, agree with the plain step's)."""
    assert zero_runs["bf16"][stage]["copy_is_cast"] is True


def _assert_resumed_like_the_plain_run(run: dict, plain_run: dict) -> None:
    assert run["resumed_from"] == W.SAVE_AT and run["rng_restored"]
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(plain_run["losses"][W.SAVE_AT :]), **LOSS_TOL)
    _assert_states_close(run["final"], plain_run, **WEIGHT_TOL)


@needs_ds
@pytest.mark.parametrize("stage", W.FROM_ONE_STAGES)
def test_a_run_saved_on_one_rank_resumes_on_two(stage, zero_runs, plain_run):
    """A world of one trains three steps on the global batch and saves; two ranks resume it (DeepSpeed's
    universal checkpoint) and train steps 4-5: losses and weights as one uninterrupted run (AdamW's
    moments and step count, the target encoder and the RNG all continue)."""
    _assert_resumed_like_the_plain_run(zero_runs["from1"][stage], plain_run)


@needs_ds
@pytest.mark.slow
@pytest.mark.parametrize("stage", W.FROM_TWO_STAGES)
def test_a_run_saved_on_two_ranks_resumes_on_one(stage, from_two_ranks, plain_run):
    run = from_two_ranks[stage]
    _assert_resumed_like_the_plain_run(run, plain_run)
    exported = torch.load(run["exported"], map_location="cpu", weights_only=True)  # what ijepa-eval reads
    assert exported["world_size"] == 1 and exported["step"] == W.STEPS
    _assert_states_close(exported, run["final"], rtol=0, atol=0)


@needs_ds
@pytest.mark.slow
def test_a_payload_planted_in_a_checkpoint_resumed_on_another_world_size_is_refused(from_two_ranks):
    """In a rank's file that only the conversion reads, and in a file of the universal checkpoint
    that DeepSpeed reads past our checkpoint engine: refused, naming the file; nothing ran."""
    planted = from_two_ranks["planted"]
    assert {(p["stage"], p["where"]) for p in planted} == {
        (stage, where) for stage in W.FROM_TWO_STAGES for where in ("rank file", "universal file")
    }
    for p in planted:
        assert p["file"] in p["error"] and "posix.system" in p["error"], p
        assert not Path(p["marker"]).exists(), f"the payload in {p['file']} ran"


# ----------------------------------------------------------------------------- one process: timeouts, safe loads


@pytest.fixture(scope="module")
def single_rank(tmp_path_factory) -> dict:
    """ds_worker.py ``single``: ZeRO 0-3 in a world of one: checkpoints with payloads planted,
    compile counts, and checkpoints for ``zero_runs`` to resume on two ranks (in ``folder``).
    ``log``: the process's output."""
    if not available("deepspeed"):
        pytest.skip("deepspeed is not installed")
    out = tmp_path_factory.mktemp("single")
    codes, texts, _ = launch("single", out, timeout=600, world=1)
    assert codes == [0], _tail(texts)
    return {**json.loads((out / "single.json").read_text()), "folder": out, "log": texts[0]}


@needs_ds
def test_every_process_group_deepspeed_creates_takes_the_job_timeout(single_rank):
    timeouts = single_rank["group_timeouts"]
    assert len(timeouts) > 1  # the default group and DeepSpeed's own (its data-parallel clone of the world)
    assert timeouts == [W.SINGLE_TIMEOUT_S] * len(timeouts)


@needs_ds
def test_a_payload_planted_in_any_deepspeed_checkpoint_file_is_refused_and_runs_nothing(single_rank):
    assert single_rank["clean_resume"] == {str(stage): 1 for stage in range(4)}  # DeepSpeed's records still load
    planted = single_rank["planted"]
    kinds = {(p["stage"], re.sub(r"\d+", "N", Path(p["file"]).name)) for p in planted}
    for stage in (1, 2, 3):  # model states, optimizer states and our own per-rank file, at every ZeRO stage
        assert {name for s, name in kinds if s == stage} >= {
            "zero_pp_rank_N_mp_rank_N_optim_states.pt",
            "ijepa_rankN.pt",
        }
    assert (0, "mp_rank_N_model_states.pt") in kinds and (3, "zero_pp_rank_N_mp_rank_N_model_states.pt") in kinds
    for p in planted:
        assert p["file"] in p["error"] and "posix.system" in p["error"], p
        assert not Path(p["marker"]).exists(), f"the payload in {p['file']} ran"


@needs_ds
@pytest.mark.parametrize("stage", (0, 1, 2, 3))
def test_a_failed_write_in_deepspeeds_own_save_names_the_file_and_keeps_the_previous_checkpoint(stage, single_rank):
    """DeepSpeed's save wrote through torch's C++ writer: a write the kernel refused raised a
    RuntimeError naming no file and left a truncated model-states file in the new tag."""
    report = single_rank["full_disk"][str(stage)]
    assert report["error"] is not None and report["error"]["type"] == "OSError", report
    assert report["error"]["errno"] == errno.EFBIG
    failed = Path(report["error"]["filename"])
    assert failed.parent == Path(report["failed_tag"]) and failed.suffix == ".pt"
    left = report["left_in_failed_tag"]
    assert failed.name not in left and not any(name.endswith(".tmp") for name in left), left
    assert report["latest"] == 1 and report["resumed_step"] == 1


@needs_ds
@pytest.mark.parametrize("stage", (0, 1, 2, 3))
def test_a_background_save_into_the_last_ones_buffers_writes_what_a_save_in_the_step_writes(stage, single_rank):
    """The second of two background saves copies into the first one's host buffers; every file of
    its tag and its export equal those of a save in the step at the same step, bit for bit."""
    report = single_rank["background"][str(stage)]
    assert report["files"] >= 3 and report["buffers"] > 0, report  # DeepSpeed's files, ours, the export
    assert report["reused_buffers"], report
    assert report["differ"] == {}, report  # file: where its first difference is


@needs_ds
@pytest.mark.parametrize("stage", (0, 1, 2, 3))
def test_the_checkpoint_size_estimate_matches_what_one_rank_wrote(stage, single_rank):
    sizes = single_rank["sizes"][str(stage)]
    assert sizes["estimate"] == pytest.approx(sizes["on_disk"], rel=SIZE_TOL)


@needs_ds
@pytest.mark.parametrize("stage", (0, 1, 2, 3))
def test_building_engines_from_the_gpu_config_reaches_no_op_build(stage, zero_runs):
    """ZeRO 0-3 built from the config generated for a CUDA device: no DeepSpeed op builder's
    ``load`` / ``jit_load`` (nor torch's JIT extension build) is called."""
    assert zero_runs["bf16"][stage]["builds"] == []


@needs_ds
@pytest.mark.parametrize("stage", (0, 1, 2, 3))
def test_no_step_reads_the_device_at_any_zero_stage(stage, zero_runs):
    """Two ranks, the GPU's config, bf16 autocast: after two warm-up steps (ZeRO-3 records its
    parameter trace), three steps call none of item, tolist, bool, float, int, cpu, numpy on a
    tensor on rank 0."""
    assert zero_runs["bf16"][stage]["host_reads"] == {}


@needs_ds
def test_compile_under_zero_breaks_no_graph_and_is_off_at_stage_3(single_rank):
    """speed.compile=on, built as the trainer builds it, a backend counting the graphs it gets:
    ZeRO 0-2 compile each block once (no graph break, no recompile in four more steps); ZeRO-3
    runs eager, with one line in the log saying why (compiled under it, blocks broke into dozens
    of graphs and hit the recompile limit)."""
    counts = single_rank["compile"]
    for stage in ("0", "1", "2"):
        assert counts[stage]["graphs"] > 0 and counts[stage]["breaks"] == 0 and counts[stage]["recompiles"] == 0
    assert counts["3"] == {"graphs": 0, "breaks": 0, "recompiles": 0}
    reasons = [line for line in single_rank["log"].splitlines() if "speed.compile=on: off" in line]
    assert len(reasons) == 1 and "ZeRO-3" in reasons[0], reasons


@needs_ds
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_zero_builds_no_op_and_no_step_synchronizes(tmp_path):
    """One GPU, ZeRO 0-3 with the generated config, bf16 autocast, torch's fused AdamW, the tiny
    model: building each engine reaches no op build (no nvcc), and three steps after two warm-up
    steps run under ``torch.cuda.set_sync_debug_mode("error")`` with finite losses."""
    codes, texts, _ = launch("gpu", tmp_path, timeout=240, world=1, extra_env={"DS_ACCELERATOR": "cuda"})
    assert codes == [0], _tail(texts)
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert report["builds"] == {str(stage): [] for stage in range(4)}
    assert report["syncs"] == {str(stage): "" for stage in range(4)}
    for losses in report["losses"].values():
        assert len(losses) == W.COUNTED and all(math.isfinite(x) for x in losses), report["losses"]


@needs_ds
def test_a_payload_planted_in_a_consolidated_export_is_refused(single_rank, tmp_path):
    from ijepa_fast.io.checkpoint import UntrustedCheckpointError, load_latest
    from ijepa_fast.io.load import load_encoder
    from tests.payloads import plant

    for stage, exported in single_rank["exports"].items():
        folder = tmp_path / f"export{stage}"
        shutil.copytree(Path(exported).parent, folder, symlinks=True)
        path, marker = folder / Path(exported).name, tmp_path / f"ran{stage}"
        plant(path, marker)
        with pytest.raises(UntrustedCheckpointError, match=re.escape(str(path))):
            load_latest(folder)
        with pytest.raises(UntrustedCheckpointError, match=re.escape(str(path))):
            load_encoder(path)
        assert not marker.exists()


@needs_ds
@pytest.mark.parametrize("stage", STAGES)
def test_weights_finite_is_false_on_every_rank_when_one_rank_holds_a_nan(stage, zero_runs):
    assert zero_runs[stage]["finite_check"] == (True, False)  # rank 0's answer, before and after rank 1's NaN


@needs_ds
@pytest.mark.parametrize("stage", STAGES)
def test_an_unfinished_newer_tag_does_not_displace_the_checkpoint_just_saved(stage, zero_runs):
    """keep=1, and a tag of a later step that a killed save left: the step-3 tag stays (and resumes)."""
    assert zero_runs[stage]["tags_after_save"] == [W.SAVE_AT, W.SAVE_AT + 6]
    assert zero_runs[stage]["resumed_from"] == W.SAVE_AT


@needs_ds
def test_a_locked_run_folder_stops_every_rank(tmp_path):
    """Rank 0 alone takes the run folder's lock; when it cannot, rank 1 must stop too, not wait."""
    from tests.test_trainer import held_run_folder, tiny_overrides, write_idx

    data = write_idx(tmp_path / "data", n=32)
    with held_run_folder(tmp_path / "runs", "locked"):
        overrides = tiny_overrides(data, tmp_path / "runs", "locked", **{"run.engine": "deepspeed"})
        codes, texts, _ = launch("locked", tmp_path, *overrides, timeout=240, extra_env={dist_.TIMEOUT_ENV: "60"})
    assert codes == [5, 5], _tail(texts)
    assert f"in use by pid {os.getpid()} on host" in texts[0]
    assert "another rank could not prepare the run folder" in texts[1]


@needs_ds
def test_a_run_whose_checkpoints_cannot_fit_is_refused_on_every_rank_before_step_0(tmp_path):
    """The disk-space check with DeepSpeed's estimate: rank 0 refuses in one line, rank 1 stops too."""
    from tests.test_trainer import tiny_overrides, write_idx

    data = write_idx(tmp_path / "data", n=32)
    overrides = tiny_overrides(data, tmp_path / "runs", "small", **{"run.engine": "deepspeed"})
    codes, texts, _ = launch("small_disk", tmp_path, *overrides, timeout=240, extra_env={dist_.TIMEOUT_ENV: "60"})
    assert codes == [8, 8], _tail(texts)
    # one line: ``.`` matches no newline
    refusal = r"refused: InsufficientSpaceError: .* 4 checkpoints of about .* need .* free.* run.keep_checkpoints"
    assert re.search(refusal, texts[0]), _tail(texts)
    assert "refused: RunFolderError: another rank could not prepare" in texts[1], _tail(texts)
    run = tmp_path / "runs" / "small"
    assert not list(run.glob("deepspeed/step_*")) and not list(run.glob("checkpoints/ckpt-*"))


def test_a_kill_9_during_a_background_write_leaves_the_previous_checkpoint_the_latest(tmp_path):
    """Two ranks save every 2 steps in the background (the default); step 4's write hangs half-done
    on both and they are killed: ``latest`` still names step 2, whose tag and consolidated export load
    weights-only, and step 4's export was never written."""
    from ijepa_fast.engines.deepspeed import files
    from ijepa_fast.io import checkpoint as ckpt
    from tests.test_trainer import tiny_overrides, write_idx

    data = write_idx(tmp_path / "data", n=64)  # 4 steps of 2 ranks x 8
    overrides = tiny_overrides(
        data, tmp_path / "runs", "hung", **{"run.engine": "deepspeed", "run.checkpoint_every": 2}
    )
    argv = [sys.executable, str(REPO / "tests" / "ds_worker.py"), "hung_write", str(tmp_path), *overrides]
    procs, logs = start_ranks(argv, tmp_path, "hung", {dist_.TIMEOUT_ENV: "120"})
    try:
        deadline = time.perf_counter() + 240
        while time.perf_counter() < deadline and any(p.poll() is None for p in procs):
            texts = [Path(log.name).read_text() for log in logs]
            if all("hung" in text for text in texts):
                break
            time.sleep(0.5)
        assert all(p.poll() is None for p in procs), _tail([Path(log.name).read_text() for log in logs])
    finally:
        _stop_all(procs)  # SIGKILL
    texts = _read_and_close(logs)
    assert all("hung" in text for text in texts), _tail(texts)
    run = tmp_path / "runs" / "hung"
    assert files.latest_step(run / "deepspeed") == 2
    for rank in (0, 1):
        assert ckpt.load_file(files.rank_file(run / "deepspeed" / files.tag(2), rank), override=None)["step"] == 2
    assert ckpt.newest_loadable(run / "checkpoints") == run / "checkpoints" / ckpt.checkpoint_name(2)
    assert not (run / "checkpoints" / ckpt.checkpoint_name(4)).exists()


def test_a_nan_loss_on_one_rank_stops_every_rank_at_that_step_and_each_leaves_the_group(tmp_path):
    from tests.test_trainer import tiny_overrides, write_idx

    data = write_idx(tmp_path / "data", n=32)
    overrides = tiny_overrides(data, tmp_path / "runs", "nan", **{"run.engine": "deepspeed"})
    codes, texts, _ = launch("nan", tmp_path, *overrides, timeout=240, extra_env={dist_.TIMEOUT_ENV: "60"})
    assert codes == [7, 7], _tail(texts)
    assert all("non-finite at step 1" in text for text in texts), _tail(texts)


@needs_ds
@pytest.mark.parametrize("stage", (0, 1, 3))
def test_a_nan_loss_after_good_steps_is_skipped_on_every_rank_and_the_weights_before_it_are_saved(tmp_path, stage):
    """Rank 1's loss turns NaN at step 3 (index 2); logs every 2 steps. The fused AdamW inside
    DeepSpeed takes the flag (the loss mean, and the gradient norm ZeRO computes; at stage 0 the
    reduced gradients) as found_inf: steps 3 and 4 change no rank's parameters, moments or step
    counts, bit for bit; the log after step 4 stops both ranks naming step 3, and the export saved on
    the stop (step 2) holds the weights and target encoder from before step 3."""
    from tests.test_trainer import tiny_overrides, write_idx

    data = write_idx(tmp_path / "data", n=96)  # 6 steps of 2 ranks x 8
    overrides = tiny_overrides(
        data,
        tmp_path / "runs",
        "nan",
        **{"run.engine": "deepspeed", "run.zero_stage": stage, "run.log_every": 2, "run.checkpoint_every": 100},
    )
    codes, texts, _ = launch("nan_after", tmp_path, "2", *overrides, timeout=300, extra_env={dist_.TIMEOUT_ENV: "60"})
    assert codes == [7, 7], _tail(texts)
    assert all("non-finite at step 3" in text for text in texts), _tail(texts)
    assert "the last good checkpoint is" in texts[0] and "ckpt-00000002.pt" in texts[0], _tail(texts)  # rank 0 wrote it
    reports = [json.loads((tmp_path / f"nan_after_rank{rank}.json").read_text()) for rank in range(WORLD)]
    assert [r["steps_run"] for r in reports] == [4, 4]
    assert all(r["optimizer_unchanged"] for r in reports), reports
    assert reports[0]["export_step"] == 2 and reports[0]["export_matches"], reports[0]
    assert (tmp_path / "runs" / "nan" / "deepspeed" / "latest").read_text().strip() == "step_00000002"


def test_a_dead_rank_fails_its_peer_instead_of_hanging(tmp_path):
    codes, texts, elapsed = launch("die", tmp_path, timeout=90, extra_env={dist_.TIMEOUT_ENV: "20"})
    assert codes[1] == 3
    assert codes[0] == 17, _tail(texts)
    assert "collective failed" in texts[0]
    assert elapsed < 60, elapsed


STALL_TIMEOUT_S = 10
# From SIGSTOP to the survivor's exit beyond the timeout: the collective in flight, then logging and
# interpreter exit; 7 s measured on 2 cores under a load average of 10 (torch's own default is 1800 s).
STALL_MARGIN_S = 20


@needs_ds
@pytest.mark.slow
def test_a_stalled_rank_ends_its_peer_within_the_timeout_at_every_zero_stage(tmp_path):
    """ijepa-pretrain on two ranks, one run for each ZeRO stage 0-3 (all at once, to share the wait);
    rank 1 is stopped (SIGSTOP) once rank 0 has logged step 2. Rank 0 must exit non-zero within
    run.dist_timeout_s plus a margin, with one line naming the timeout, at every stage: DeepSpeed's
    own process groups (ZeRO-1/2 reduce on them) must carry the timeout, not torch's 30 minutes."""
    from tests.test_trainer import DETERMINISTIC_ENV, tiny_overrides, write_idx

    data = write_idx(tmp_path / "data", n=96)
    runs = {}
    for stage in (0, 1, 2, 3):
        overrides = {"run.engine": "deepspeed", "run.zero_stage": stage, "run.dist_timeout_s": STALL_TIMEOUT_S}
        overrides |= {"optim.epochs": 1000, "run.checkpoint_every": 10**6}  # still training when stopped
        args = tiny_overrides(data, tmp_path / "runs", f"zero{stage}", **overrides)
        runs[stage] = start_ranks(
            [sys.executable, "-m", "ijepa_fast.cli.pretrain", *args], tmp_path, f"zero{stage}", DETERMINISTIC_ENV
        )
    stopped, ended = {}, {}
    deadline = time.perf_counter() + 480
    try:
        while len(ended) < len(runs) and time.perf_counter() < deadline:
            for stage, (procs, logs) in runs.items():
                if stage not in stopped and procs[0].poll() is None and "step 2 loss" in _peek(logs[0]):
                    os.kill(procs[1].pid, signal.SIGSTOP)
                    stopped[stage] = time.perf_counter()
                if stage not in ended and procs[0].poll() is not None:
                    ended[stage] = time.perf_counter()
            time.sleep(0.2)
    finally:
        for procs, _ in runs.values():
            _stop_all(procs)
    for stage, (procs, logs) in runs.items():
        survivor = _read_and_close(logs)[0]
        assert stage in stopped, f"ZeRO-{stage}: rank 0 ended before step 2\n{survivor[-3000:]}"
        assert stage in ended, f"ZeRO-{stage}: rank 0 still blocked after the test's deadline\n{survivor[-3000:]}"
        assert procs[0].returncode not in (0, -signal.SIGKILL), f"ZeRO-{stage}\n{survivor[-3000:]}"
        waited = ended[stage] - stopped[stage]
        assert waited < STALL_TIMEOUT_S + STALL_MARGIN_S, (stage, waited)
        failure = [line for line in survivor.splitlines() if "a collective failed" in line]
        assert len(failure) == 1 and f"the {STALL_TIMEOUT_S} s timeout (run.dist_timeout_s)" in failure[0], survivor[
            -3000:
        ]
        assert "Traceback" not in survivor, survivor[-3000:]


def _peek(log) -> str:
    """What a running process has written so far (read through a new handle: the log's own file
    offset is shared with the child)."""
    return Path(log.name).read_text()


# ----------------------------------------------------------------------------- config generation


def _cfg(**run):
    cfg = W.tiny_config(2)
    for k, v in run.items():
        setattr(cfg.run, k, v)
    return cfg


def test_generated_config_follows_our_config():
    from ijepa_fast.engines.deepspeed import deepspeed_config, global_batch

    cfg = _cfg()
    ds = deepspeed_config(cfg, world_size=4, grad_accum=3, device_type="cpu")
    assert ds["train_micro_batch_size_per_gpu"] == W.PER_RANK
    assert ds["gradient_accumulation_steps"] == 3 and ds["train_batch_size"] == W.PER_RANK * 4 * 3
    assert global_batch(ds) == (W.PER_RANK * 12, W.PER_RANK, 4, 3)
    assert ds["zero_optimization"] == {"stage": 2} and ds["gradient_clipping"] == W.GRAD_CLIP
    params = ds["optimizer"]["params"]
    assert ds["optimizer"]["type"] == "AdamW" and params["torch_adam"] is True and params["fused"] is True
    assert params["betas"] == list(cfg.optim.betas) and params["eps"] == cfg.optim.eps
    # a GPU: torch's fused AdamW through DeepSpeed's config, so DeepSpeed builds no FusedAdam with nvcc
    for stage in (0, 1, 2, 3):
        gpu = deepspeed_config(_cfg(dtype="auto", zero_stage=stage), world_size=8, device_type="cuda")
        assert gpu["optimizer"]["params"] == {
            "torch_adam": True,
            "fused": True,
            "lr": cfg.optim.start_lr,
            "weight_decay": cfg.optim.weight_decay,
            "betas": list(cfg.optim.betas),
            "eps": cfg.optim.eps,
        }
        # bf16 is the step's autocast over fp32 weights; gradients are reduced in fp32
        assert gpu["bf16"]["enabled"] is False and gpu["torch_autocast"]["enabled"] is False
        assert gpu["communication_data_type"] == "fp32"
        # the step owns gradient accumulation: every engine step() is an optimizer step
        assert gpu["managed_gradient_accumulation"] is False
    authors = _cfg()
    authors.speed.fused_optimizer = False  # torch's default AdamW, as the authors
    assert "fused" not in deepspeed_config(authors, world_size=8, device_type="cuda")["optimizer"]["params"]
    json.dumps(ds)  # serialisable as DeepSpeed's JSON


def test_user_ds_config_overrides_other_keys_and_may_repeat_ours(tmp_path):
    from ijepa_fast.engines.deepspeed import deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps(
            {
                "train_batch_size": "auto",
                "train_micro_batch_size_per_gpu": W.PER_RANK,
                "zero_optimization": {"stage": 2, "reduce_bucket_size": 12345, "offload_optimizer": {"device": "cpu"}},
                "optimizer": {"params": {"betas": [0.9, 0.999]}},
                "steps_per_print": 50,
            }
        )
    )
    ds = deepspeed_config(_cfg(ds_config=str(path)), world_size=2)
    assert ds["train_batch_size"] == W.PER_RANK * 2  # "auto" takes ours
    assert ds["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 12345, "offload_optimizer": {"device": "cpu"}}
    assert ds["steps_per_print"] == 50 and ds["optimizer"]["type"] == "AdamW"


def test_conflicting_ds_config_is_an_error_naming_both_keys_and_values(tmp_path):
    from ijepa_fast.engines.deepspeed import deepspeed_config

    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps(
            {
                "train_batch_size": 64,
                "train_micro_batch_size_per_gpu": 8,
                "zero_optimization": {"stage": 3},
                "scheduler": {"type": "WarmupLR"},
                "bf16": {"enabled": True},
                "checkpoint": {"load_universal": True},
            }
        )
    )
    with pytest.raises(ConfigError) as err:
        deepspeed_config(_cfg(ds_config=str(path)), world_size=2)
    msg = str(err.value)
    assert f"train_micro_batch_size_per_gpu=8 in run.ds_config={path}" in msg
    assert f"conflicts with train_micro_batch_size_per_gpu={W.PER_RANK} from data.batch_size={W.PER_RANK}" in msg
    assert f"train_batch_size=64 in run.ds_config={path} conflicts with train_batch_size={W.PER_RANK * 2}" in msg
    assert "zero_optimization.stage=3" in msg and "run.zero_stage=2" in msg
    assert "scheduler" in msg
    assert "bf16.enabled=True" in msg and "fp32 weights under the training step's autocast" in msg
    assert "checkpoint.load_universal=True" in msg
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        deepspeed_config(_cfg(ds_config=str(bad)), world_size=1)
    with pytest.raises(ConfigError, match="does not exist"):
        deepspeed_config(_cfg(ds_config=str(tmp_path / "missing.json")), world_size=1)


def test_deepspeeds_reads_during_a_resharded_load_are_weights_only(tmp_path):
    """While a checkpoint is converted to a universal one and loaded, DeepSpeed's own
    ``torch.load(..., weights_only=False)`` calls go through ``checkpoint.load_file``: tensors and
    plain data load, a pickled payload is refused naming the file and runs nothing, and
    ``torch.load`` is torch's again afterwards."""
    from ijepa_fast.engines.deepspeed import patches
    from ijepa_fast.io.checkpoint import UntrustedCheckpointError
    from tests.payloads import plant

    good, bad, marker = tmp_path / "exp_avg.pt", tmp_path / "exp_avg_sq.pt", tmp_path / "ran"
    torch.save({"param": torch.arange(3.0), "step": 2}, good)
    torch.save({"param": torch.arange(3.0)}, bad)
    plant(bad, marker)
    real = torch.load
    with patches.weights_only_torch_load([]):
        loaded = torch.load(good, weights_only=False)  # as DeepSpeed's readers call it
        with pytest.raises(UntrustedCheckpointError, match=re.escape(str(bad))):
            torch.load(bad, map_location="cpu", weights_only=False)
    assert torch.equal(loaded["param"], torch.arange(3.0)) and loaded["step"] == 2
    assert not marker.exists() and torch.load is real


def test_stage3_target_config_partitions_without_optimizer_or_persistence():
    from ijepa_fast.engines.deepspeed import deepspeed_config, target_config

    ds = deepspeed_config(_cfg(zero_stage=3, dtype="bf16"), world_size=2, device_type="cuda")
    tc = target_config(ds)
    assert "optimizer" not in tc and "bf16" not in tc and "gradient_clipping" not in tc
    assert tc["zero_optimization"]["stage"] == 3
    assert tc["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    assert tc["train_batch_size"] == ds["train_batch_size"]


class _EngineStandIn:
    """DeepSpeed's engine as far as our checkpoint code reaches it: saving takes the client state;
    loading fails as DeepSpeed's does on a checkpoint of another ZeRO stage, with a bare assertion."""

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        pass

    def load_checkpoint(self, *args, **kwargs):
        raise AssertionError


def _step_on_stand_in(stage: int):
    from ijepa_fast.engines.deepspeed import DeepSpeedEngine

    step = DeepSpeedEngine.__new__(DeepSpeedEngine)  # no DeepSpeed engine: only the checkpoint code runs
    step.zero_stage, step.engine, step.target_encoder = stage, _EngineStandIn(), torch.nn.Linear(2, 2)
    return step


def test_a_changed_zero_stage_is_refused_before_deepspeed_loads(tmp_path):
    _step_on_stand_in(1).save_checkpoint(tmp_path, 3)
    refusal = (
        r"step_00000003 was written with run.zero_stage=1, this run has run.zero_stage=3: resume with run.zero_stage=1"
    )
    with pytest.raises(ValueError, match=refusal):
        _step_on_stand_in(3).load_checkpoint(tmp_path)


# ----------------------------------------------------------------------------- launcher environments


def test_detect_torchrun_slurm_and_single_process():
    env = dist_.detect(
        {
            "RANK": "3",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "MASTER_ADDR": "n1",
            "MASTER_PORT": "29501",
            "SLURM_PROCID": "0",
            "SLURM_STEP_NUM_TASKS": "2",
        }
    )  # torchrun inside SLURM: torchrun wins
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.launcher) == (
        3,
        8,
        1,
        "n1",
        29501,
        "env",
    )
    slurm = {
        "SLURM_PROCID": "5",
        "SLURM_STEP_NUM_TASKS": "16",
        "SLURM_LOCALID": "5",
        "SLURM_JOB_ID": "123456",
        "SLURM_STEP_NODELIST": "gpu[07-08]",
    }
    env = dist_.detect(slurm)
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (5, 16, 5, "gpu07", "slurm")
    assert env.master_port == 20000 + 123456 % 20000 == dist_.detect({**slurm, "SLURM_PROCID": "9"}).master_port
    # inside the sbatch script itself (no srun step): one process, not a world of SLURM_NTASKS
    env = dist_.detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_ID": "1"})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single") and env.master_port > 0
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        dist_.detect({"RANK": "0", "WORLD_SIZE": "2"})


def test_expand_nodelist_like_scontrol():
    assert dist_.expand_nodelist("gpu[01-03,7],login1") == ["gpu01", "gpu02", "gpu03", "gpu7", "login1"]
    assert dist_.expand_nodelist("node5") == ["node5"]
    assert dist_.expand_nodelist("a[9-10]") == ["a9", "a10"]


def test_timeout_and_engine_resolution():
    assert dist_.resolve_timeout(None, {}).total_seconds() == dist_.DEFAULT_TIMEOUT_S
    assert dist_.resolve_timeout(None, {dist_.TIMEOUT_ENV: "7.5"}).total_seconds() == 7.5
    assert dist_.resolve_timeout(3, {dist_.TIMEOUT_ENV: "7.5"}).total_seconds() == 3
    with pytest.raises(ValueError, match=dist_.TIMEOUT_ENV):
        dist_.resolve_timeout(None, {dist_.TIMEOUT_ENV: "soon"})
    one = dist_.detect({})
    two = dist_.detect({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert resolve_engine("auto", one.world_size) == "plain" and resolve_engine("auto", two.world_size) == "deepspeed"
    with pytest.raises(ValueError, match="run.engine=deepspeed"):
        resolve_engine("plain", two.world_size)


# ----------------------------------------------------------------------------- launch scripts


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize(
    "script, env, expected",
    [
        (
            "single_node.sh",
            {"NUM_GPUS": "2"},
            [
                "-m deepspeed.launcher.runner --num_gpus 2 --master_port 29500 --no_local_rank "
                "--module ijepa_fast.cli.pretrain"
            ],
        ),
        (
            "multi_node.sh",
            {"HOSTFILE": "hosts.txt", "NUM_NODES": "2", "NUM_GPUS": "8", "MASTER_ADDR": "n1"},
            [
                "--hostfile hosts.txt",
                "--num_nodes 2",
                "--num_gpus 8",
                "--master_addr n1",
                "--module ijepa_fast.cli.pretrain",
            ],
        ),
        (
            "torchrun.sh",
            {"NPROC_PER_NODE": "2"},
            ["-m torch.distributed.run --standalone --nproc_per_node 2 -m ijepa_fast.cli.pretrain"],
        ),
        (
            "torchrun.sh",
            {"NNODES": "2", "NPROC_PER_NODE": "8", "NODE_RANK": "1", "MASTER_ADDR": "n1"},
            ["--nnodes 2 --node_rank 1 --master_addr n1 --master_port 29500 --nproc_per_node 8"],
        ),
        (
            "slurm.sbatch",
            {"SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "42", "GPUS_PER_NODE": "4"},
            [
                "srun",
                "--nnodes 2 --nproc_per_node 4",
                "--rdzv_endpoint gpu01:20042 --rdzv_conf join_timeout=1800",
                "-m ijepa_fast.cli.pretrain",
            ],
        ),
    ],
)
def test_launch_scripts_build_their_commands(script, env, expected, tmp_path):
    out = _dry_run(script, env, tmp_path, "--config", "configs/demo.yaml", "optim.lr=5e-4")
    assert out.returncode == 0, out.stderr
    command = out.stdout.strip().splitlines()[-1]
    for part in expected:
        assert part in command, (part, command)
    # the multi-node scripts pass the resolved collective timeout on to every process
    passed = " run.dist_timeout_s=1800" if script in ("multi_node.sh", "slurm.sbatch") else ""
    assert command.endswith(f"--config configs/demo.yaml optim.lr=5e-4{passed}"), command


def _dry_run(script: str, env: dict, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    fake = tmp_path / "scontrol"  # SLURM's `scontrol show hostnames gpu[01-02]`
    fake.write_text("#!/bin/sh\nprintf 'gpu01\\ngpu02\\n'\n")
    fake.chmod(0o755)
    run_env = {k: v for k, v in os.environ.items() if k != dist_.TIMEOUT_ENV}
    run_env |= {
        "IJEPA_LAUNCH_DRY_RUN": "1",
        "PYTHON": sys.executable,
        "PYTHONPATH": str(REPO),
        **env,
        "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
    }
    return subprocess.run(
        ["bash", str(REPO / "launch" / script), *args], env=run_env, capture_output=True, text=True, timeout=120
    )


SLURM_2x8 = {"SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "42", "GPUS_PER_NODE": "8"}


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize("script, env", [("slurm.sbatch", SLURM_2x8), ("multi_node.sh", {})])
def test_multi_node_scripts_print_the_world_layout_and_pass_the_collective_timeout(script, env, tmp_path):
    """2 nodes x 8 GPUs (the hostfile's slots, or SLURM's): one layout line at start; the timeout from
    IJEPA_DIST_TIMEOUT_S, or from run.dist_timeout_s, reaches every process on the command line (and
    torchrun's rendezvous); a config error stops the script before it launches anything."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("gpu01 slots=8\ngpu02 slots=8\n")
    env = {**env, "HOSTFILE": str(hostfile), dist_.TIMEOUT_ENV: "600"}
    base = (
        "--config",
        "configs/demo.yaml",
        "data.batch_size=64",
        "optim.grad_accum=2",
        "speed.bf16_target_copy=false",
        "run.zero_stage=3",
    )
    out = _dry_run(script, env, tmp_path, *base)
    assert out.returncode == 0, out.stderr
    layout = [line for line in out.stderr.splitlines() if line.startswith("ijepa: ")]
    assert layout == [
        "ijepa: 2 node(s) x 8 process(es) = 16 ranks, rendezvous gpu01:"
        + ("20042" if script == "slurm.sbatch" else "29500")
        + "; global batch 2048 = 64 per rank x 16 ranks x 2 accumulation; engine deepspeed, ZeRO stage 3; "
        "collective timeout 600 s (IJEPA_DIST_TIMEOUT_S)"
    ], out.stderr
    assert out.stdout.strip().endswith("run.zero_stage=3 run.dist_timeout_s=600")
    out = _dry_run(script, env, tmp_path, *base, "run.dist_timeout_s=90.5")
    command = out.stdout.strip()
    assert command.endswith("run.dist_timeout_s=90.5 run.dist_timeout_s=90.5"), command
    assert "(run.dist_timeout_s)" in out.stderr
    if script == "slurm.sbatch":
        assert "--rdzv_conf join_timeout=91" in command
    out = _dry_run(script, env, tmp_path, "--config", "configs/demo.yaml", "run.zero_stage=9")
    assert out.returncode == 2 and out.stdout == "", out.stdout
    assert "ijepa: config error: run.zero_stage=9" in out.stderr


# ----------------------------------------------------------------------------- the CLI under both launchers


@needs_ds
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_pretrain_under_torchrun_then_the_deepspeed_launcher_resumes_like_one_run(tmp_path):
    from tests.test_trainer import DETERMINISTIC_ENV, losses, tiny_overrides, write_idx

    data = write_idx(tmp_path / "data", n=96)  # 6 steps of 2 ranks x 8
    env = {
        **os.environ,
        **DETERMINISTIC_ENV,
        "DS_ACCELERATOR": "cpu",
        "PYTHON": sys.executable,
        "PYTHONPATH": str(REPO),
        "NPROC_PER_NODE": "2",
        "NUM_GPUS": "2",
        "MASTER_PORT": str(dist_.free_port()),
    }

    def run(script: str, name: str, *extra: str) -> None:
        args = tiny_overrides(data, tmp_path / "runs", name, **{"run.engine": "deepspeed", "run.zero_stage": 1})
        out = subprocess.run(
            ["bash", str(REPO / "launch" / script), *args, *extra],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    run("torchrun.sh", "whole")  # checkpoints at steps 3 and 6
    runs = tmp_path / "runs"
    shutil.copytree(runs / "whole", runs / "split")
    (runs / "split" / "deepspeed" / "latest").write_text("step_00000003")  # as if killed after step 3
    run("single_node.sh", "split", "--resume")
    assert "resumed from step 3" in (runs / "split" / "train.log").read_text()
    split, whole = losses(runs / "split"), losses(runs / "whole")
    assert sorted(whole) == [1, 2, 3, 4, 5, 6]
    assert split == whole  # steps 4-6 recomputed; bitwise: the CSV holds the same decimal strings
    exported = torch.load(runs / "split" / "checkpoints" / "latest.pt", weights_only=True)
    assert exported["step"] == 6 and {"encoder", "predictor", "target_encoder"} <= exported.keys()
