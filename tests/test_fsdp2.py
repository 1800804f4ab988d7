"""The FSDP2 engine on CPU (gloo): two ranks against the single-process plain step, checkpoints through
``torch.distributed.checkpoint`` across world sizes, and its weights-only reads.

One launch of ``tests/fsdp2_worker.py two`` on two ranks does the 10-step run (blocks compiled with a
backend that counts graphs), an asynchronous save at step 3, the shard-local EMA check, non-finite
steps on one rank and the 1 -> 2 resume; it then hangs in a save of step 10 and is killed with SIGKILL.
A world of one runs inside this process before (the checkpoint the two ranks resume) and after (the
2 -> 1 resume, a planted payload). The trainer's runs are worlds of one.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from tests import ds_worker as W
from tests import fsdp2_worker as F
from tests.test_deepspeed import _assert_states_close, _read_and_close, _stop_all, _tail, start_ranks

REPO = Path(__file__).resolve().parents[1]
LOSS_TOL = dict(rtol=1e-5, atol=1e-6)  # fp32; measured max |diff| 6e-8 over 10 steps (the ranks' halves + all-reduce)
WEIGHT_TOL = dict(rtol=1e-4, atol=1e-5)  # measured max |diff| 4.7e-7 after 10 AdamW steps (2 -> 1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp2")
    with F.in_world_of_one():
        one = F.one_saves(out)
    argv = [sys.executable, str(REPO / "tests" / "fsdp2_worker.py"), "two", str(out)]
    procs, logs = start_ranks(argv, out, "two")
    killed_while_writing = False
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and all(p.poll() is None for p in procs):
            if all((out / f"writing_rank{r}").exists() and (out / f"staged_rank{r}").exists() for r in (0, 1)):
                killed_while_writing = True
                break
            time.sleep(0.5)
    finally:
        _stop_all(procs)  # SIGKILL: the save of step 10 is still writing
    texts = _read_and_close(logs)
    assert killed_while_writing, _tail(texts)
    two = [torch.load(out / f"two_rank{r}.pt", weights_only=False) for r in (0, 1)]
    with F.in_world_of_one():
        after = F.one_resumes(out)
    return {"one": one, "two": two, "after": after, "out": out}


@pytest.fixture(scope="module")
def plain_run() -> dict:
    step = W.plain_step(F.tiny_config())
    step.schedules = F.schedules(F.tiny_config())
    losses = [step(*W.global_batch(i, 2), i)["loss"].item() for i in range(F.STEPS)]
    student, target = step.student, step.target_encoder
    return {
        "losses": losses,
        "encoder": student.encoder.state_dict(),
        "predictor": student.predictor.state_dict(),
        "target_encoder": target.state_dict(),
    }


def test_two_ranks_compute_the_plain_engines_losses_over_10_steps(runs, plain_run):
    for rank in (0, 1):
        got = torch.tensor(runs["two"][rank]["losses"])
        torch.testing.assert_close(got, torch.tensor(plain_run["losses"]), **LOSS_TOL)


def test_a_world_of_one_computes_the_plain_engines_losses(runs, plain_run):
    got = torch.tensor(runs["one"]["losses"])
    torch.testing.assert_close(got, torch.tensor(plain_run["losses"][: F.SAVE_AT]), **LOSS_TOL)


def test_compiled_blocks_do_not_recompile_after_warm_up(runs):
    """Every block compiled (a backend counting the graphs it is given): graphs in the first two
    steps, none in the eight after them."""
    for rank in (0, 1):
        assert runs["two"][rank]["graphs"] > 0 and runs["two"][rank]["recompiles"] == 0


def test_the_ema_of_the_shards_equals_the_full_ema_without_collectives(runs):
    check = runs["two"][0]["ema"]
    assert check["collectives"] == 0 and runs["two"][1]["ema"] == {"collectives": 0}
    for name, want in check["expected"].items():
        torch.testing.assert_close(check["got"][name], want, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("case", ["loss", "grad_clipped", "grad_unclipped"])
def test_a_non_finite_step_on_one_rank_is_skipped_on_every_rank(runs, case):
    """Rank 1's loss is NaN, or one value of rank 1's own gradient shard is inf (clipped: the global
    norm decides; unclipped: the ranks agree on their shards): both ranks report the step non-finite
    and leave their shards of the weights, the target and AdamW's state as they were, bit for bit."""
    for rank in (0, 1):
        report = runs["two"][rank]["finite"][case]
        assert report == {"loss_finite": case != "loss", "step_finite": False, "unchanged": True}, (rank, report)


def test_a_nan_in_one_ranks_weight_shard_is_seen_by_every_rank(runs):
    for rank in (0, 1):
        assert runs["two"][rank]["finite"]["weights_finite"] == [True, False]


def _assert_continues_the_run(run: dict, plain_run: dict) -> None:
    assert run["resumed_from"] == F.SAVE_AT and run["rng_restored"]
    got = torch.tensor(run["losses"])
    torch.testing.assert_close(got, torch.tensor(plain_run["losses"][F.SAVE_AT :]), **LOSS_TOL)
    _assert_states_close(run["final"], plain_run, **WEIGHT_TOL)


def test_a_checkpoint_of_one_rank_resumes_on_two(runs, plain_run):
    """Steps 4-10 after the 1-rank step-3 checkpoint, from another init: the same run (weights, AdamW's
    moments and step count, the target encoder, the schedules' step and the RNG all continue)."""
    for rank in (0, 1):
        run = runs["two"][rank]["from1"]
        assert run["resumed_from"] == F.SAVE_AT and run["rng_restored"]
        torch.testing.assert_close(
            torch.tensor(run["losses"]), torch.tensor(plain_run["losses"][F.SAVE_AT :]), **LOSS_TOL
        )
    _assert_states_close(runs["two"][0]["from1"]["final"], plain_run, **WEIGHT_TOL)


def test_a_checkpoint_of_two_ranks_saved_asynchronously_resumes_on_one(runs, plain_run):
    """The step-3 save returned after staging and training went on while it was written: the files
    hold the step-3 state."""
    _assert_continues_the_run(runs["after"], plain_run)


def test_a_kill_during_an_asynchronous_save_leaves_the_previous_checkpoint_the_latest(runs):
    after = runs["after"]
    assert after["latest_after_kill"] == F.SAVE_AT and after["saved_ranks"] == 2
    assert after["removed"] == ["step_00000010"]  # the unfinished folder: its shards, no .metadata


def test_a_payload_planted_in_dcps_metadata_is_refused_and_runs_nothing(runs):
    planted = runs["after"]["planted"]
    assert planted["file"] in planted["error"] and "posix.system" in planted["error"], planted
    assert not Path(planted["marker"]).exists()


def test_every_process_group_takes_the_job_timeout(runs):
    """The default group and the checkpoint's own gloo group, on two ranks and in a world of one."""
    for timeouts in (runs["two"][0]["group_timeouts"], runs["one"]["group_timeouts"]):
        assert len(timeouts) >= 2 and timeouts == [F.TIMEOUT_S] * len(timeouts)


def test_the_consolidated_copy_loads_without_fsdp(runs):
    from ijepa_fast.io.checkpoint import list_checkpoints, load_file
    from ijepa_fast.models.ijepa import build_models

    exported = Path(runs["one"]["exported"])
    assert list_checkpoints(exported.parent) == [(F.SAVE_AT, exported)]
    state = load_file(exported)
    assert state["engine"] == "fsdp2" and state["step"] == F.SAVE_AT and state["world_size"] == 1
    student, target = build_models(F.tiny_config().model, W.IMG)
    for module, key in ((student.encoder, "encoder"), (student.predictor, "predictor"), (target, "target_encoder")):
        module.load_state_dict(state[key])  # strict: plain names, full fp32 shapes
        assert all(v.dtype == torch.float32 for v in state[key].values())


def test_under_bf16_on_a_cpu_the_step_is_the_plain_engines_with_fp32_gradients_and_masters():
    """run.dtype=bf16 in a world of one on the CPU: inside the forward every weight is fp32 (CPU
    autocast refuses a bf16 LayerNorm weight beside an fp32 input, so the blocks gather fp32 there),
    the sharded gradients the optimizer reads and the sharded weights are fp32, and the losses are
    those of the plain engine under the same autocast (the DeepSpeed engine's choice) from the same
    init. On a GPU the policy gathers the blocks in bf16 and nothing else."""
    from ijepa_fast.engines.fsdp2.engine import local
    from ijepa_fast.engines.fsdp2.precision import mixed_precision, param_dtype
    from ijepa_fast.models.vit import Block

    bf16, fp32 = torch.bfloat16, torch.float32
    assert [param_dtype(bf16, block, "cuda") for block in (True, False)] == [bf16, None]
    assert [param_dtype(bf16, block, "cpu") for block in (True, False)] == [None, None]
    assert param_dtype(None, True, "cuda") is None and mixed_precision(bf16, True, "cuda").reduce_dtype == fp32
    cfg = F.tiny_config()
    cfg.run.dtype = "bf16"
    cfg = cfg.validate()
    plain = W.plain_step(cfg)
    plain.schedules = F.schedules(cfg)
    want = [plain(*W.global_batch(0, 2), 0)["loss"].item()]
    seen: dict[str, torch.dtype] = {}
    with F.in_world_of_one():
        step_fn = F.fsdp2_step(cfg)
        assert step_fn.amp_dtype == bf16
        engine, encoder = step_fn.engine, step_fn.engine.student.encoder
        block = next(m for m in encoder.modules() if isinstance(m, Block))
        watched = {"fc1": block.mlp.fc1, "norm1": block.norm1, "patch": encoder.patch_embed.proj, "norm": encoder.norm}

        def record(name):
            def hook(module, args):  # returns None: the inputs pass unchanged
                seen.setdefault(name, module.weight.dtype)

            return hook

        for name, module in watched.items():
            module.register_forward_pre_hook(record(name))
        optimizer_step, grads = engine.optimizer.step, set()

        def spy_step(*args, **kwargs):
            grads.update(local(p.grad).dtype for p in engine.student.parameters() if p.grad is not None)
            return optimizer_step(*args, **kwargs)

        engine.optimizer.step = spy_step
        got = [step_fn(*W.global_batch(0, 2), 0)["loss"].item()]
        masters = {local(p).dtype for p in [*engine.student.parameters(), *engine.target_encoder.parameters()]}
    assert seen == dict.fromkeys(watched, fp32) and grads == {fp32} and masters == {fp32}
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), **LOSS_TOL)


# ----------------------------------------------------------------------------- one process, no group


def test_a_payload_in_a_value_of_a_dcp_checkpoint_is_refused_and_runs_nothing(tmp_path):
    """DCP's default planner reads values that are not tensors with the full unpickler; ours does not."""
    import torch.distributed.checkpoint as dcp

    from ijepa_fast.engines.fsdp2.safe_load import load
    from ijepa_fast.io.checkpoint import UntrustedCheckpointError
    from tests.payloads import ShellPayload

    marker = tmp_path / "ran"
    dcp.save({"w": torch.ones(3), "group": {"lr": 0.5}}, checkpoint_id=tmp_path / "good", no_dist=True)
    dcp.save({"w": torch.ones(3), "group": {"lr": ShellPayload(marker)}}, checkpoint_id=tmp_path / "bad", no_dist=True)
    for name in ("good", "bad"):
        folder = tmp_path / name
        state = {"w": torch.zeros(3), "group": {"lr": 0.0}}
        if name == "good":
            load(state, folder, no_dist=True)
            assert torch.equal(state["w"], torch.ones(3)) and state["group"]["lr"] == 0.5
        else:
            with pytest.raises(UntrustedCheckpointError, match=re.escape(str(folder)) + r".*group\.lr.*posix\.system"):
                load(state, folder, no_dist=True)
    assert not marker.exists()


def test_a_resume_with_another_engine_is_refused_in_one_line(tmp_path):
    from ijepa_fast.io.checkpoint import save_checkpoint
    from ijepa_fast.train.build import check_resume, run_engine

    run = tmp_path / "run"
    (run / "fsdp2" / "step_00000003").mkdir(parents=True)
    (run / "fsdp2" / "step_00000003" / ".metadata").write_bytes(b"")
    (run / "fsdp2" / "step_00000005").mkdir()  # unfinished: no .metadata
    save_checkpoint(run / "checkpoints", {"w": torch.ones(1)}, 3, keep=1)  # the run's consolidated copy
    assert run_engine(run) == "fsdp2"
    check_resume(run, "fsdp2", "fsdp2")
    for other in ("plain", "deepspeed"):
        with pytest.raises(ValueError) as err:
            check_resume(run, other, other)
        assert "\n" not in str(err.value) and "run of the fsdp2 engine" in str(err.value)
        assert "run.engine=fsdp2" in str(err.value)


def test_auto_keeps_choosing_deepspeed_and_fsdp2_runs_in_any_world():
    from ijepa_fast.engines import engine_class, resolve_engine

    assert resolve_engine("auto", 2) == "deepspeed" and resolve_engine("auto", 1) == "plain"
    assert resolve_engine("fsdp2", 1) == resolve_engine("fsdp2", 8) == "fsdp2"
    assert engine_class("fsdp2").name == "fsdp2"


# ----------------------------------------------------------------------------- the trainer, a world of one


@pytest.fixture
def clean_launcher_env(monkeypatch):
    """The trainer's process group exports the rendezvous variables: restore them after the test."""
    from ijepa_fast.runtime.distributed import ENV_KEYS

    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def test_a_trainer_run_stopped_by_sigterm_and_resumed_repeats_its_losses(tmp_path, clean_launcher_env, capsys):
    """run.engine=fsdp2 through the trainer (4 steps, a checkpoint every 2): the last save is complete
    when fit returns. A copy cut back to step 2 (as if killed after it) resumes; a SIGTERM during
    step 3 stops it after that step with a complete checkpoint of step 3 (written in the background);
    a second resume runs step 4: steps 3-4 log the whole run's losses, bit for bit. A resume with
    another engine is refused in one line."""
    from ijepa_fast.train.trainer import Trainer
    from tests.test_trainer import SpyStep, losses, one_error_line, tiny_overrides, write_idx

    data = write_idx(tmp_path / "data", n=32)  # 4 steps of 8
    extra = {"run.engine": "fsdp2", "run.checkpoint_every": 2, "model.depth": 2}
    runs = tmp_path / "runs"
    first = Trainer(config_mod_load(tiny_overrides(data, runs, "whole", **extra)))
    result = first.fit()
    whole = runs / "whole"
    assert result.steps == 4 and result.checkpoint == whole / "checkpoints" / "ckpt-00000004.pt"
    assert result.checkpoint.is_file()  # written by the background thread before fit returned
    assert sorted(p.name for p in (whole / "fsdp2").iterdir()) == ["step_00000002", "step_00000004"]
    # the disk-space check's estimate of one checkpoint against what one took (tensors dominate)
    on_disk = result.checkpoint.stat().st_size + sum(
        f.stat().st_size for f in (whole / "fsdp2" / "step_00000004").iterdir()
    )
    assert first.engine.checkpoint_bytes() == pytest.approx(on_disk, rel=0.2)
    shutil.copytree(whole, runs / "split", symlinks=True)
    split = runs / "split"
    shutil.rmtree(split / "fsdp2" / "step_00000004")
    (split / "fsdp2" / "step_00000004").mkdir()  # an unfinished save: deleted at the start
    (split / "checkpoints" / "ckpt-00000004.pt").unlink()
    split_cfg = config_mod_load(tiny_overrides(data, runs, "split", **extra))
    trainer = Trainer(split_cfg, resume=True)

    def sigterm_during_step_3(step):  # 0-based
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    trainer.step_fn = SpyStep(trainer.step_fn, before=sigterm_during_step_3)
    stopped = trainer.fit()
    assert (stopped.stopped, stopped.stop_signal, stopped.steps) == ("signal", signal.SIGTERM, 3)
    assert stopped.checkpoint == split / "checkpoints" / "ckpt-00000003.pt" and stopped.checkpoint.is_file()
    assert sorted(p.name for p in (split / "fsdp2").iterdir()) == ["step_00000002", "step_00000003"]
    assert (split / "fsdp2" / "step_00000003" / ".metadata").is_file()  # complete when fit returned
    Trainer(split_cfg, resume=True).fit()
    assert losses(split) == losses(whole) and sorted(losses(whole)) == [1, 2, 3, 4]
    from ijepa_fast.cli import pretrain

    capsys.readouterr()
    plain = tiny_overrides(data, runs, "split", **{**extra, "run.engine": "plain"})
    assert pretrain.main([*plain, "--resume"]) == 1
    line = one_error_line(capsys)
    assert "holds the checkpoints of a run of the fsdp2 engine" in line and "run.engine=fsdp2" in line


def test_a_non_finite_loss_stops_the_trainer_and_the_steps_before_it_are_saved(tmp_path, clean_launcher_env):
    """From step 2 on the loss is NaN; the log after step 3 stops the run naming step 2. The save of
    step 1 it makes on the stop, written in the background, is complete before the message names it
    and holds the weights after step 1, bit for bit. Every process group the run made (the default,
    the checkpoint's) takes run.dist_timeout_s."""
    from ijepa_fast.engines.fsdp2.checkpoint import consolidated_state
    from ijepa_fast.io.checkpoint import list_checkpoints, load_file
    from ijepa_fast.train.trainer import NonFiniteLossError, Trainer
    from tests.test_trainer import SpyStep, tiny_overrides, write_idx

    data = write_idx(tmp_path / "data", n=24)  # 3 steps of 8
    extra = {"run.engine": "fsdp2", "run.log_every": 3, "run.checkpoint_every": 100, "model.depth": 2}
    extra["run.dist_timeout_s"] = 37
    trainer = Trainer(config_mod_load(tiny_overrides(data, tmp_path / "runs", "nan", **extra)))
    step_fn, forward, after_1, timeouts = trainer.step_fn, trainer.step_fn.student.forward, {}, []

    def nan_from_step_2(*args, **kwargs):
        loss = forward(*args, **kwargs)
        return loss * float("nan") if after_1 else loss

    def before(step):
        if step == 1:
            after_1.update(consolidated_state(trainer.engine))
            timeouts.extend(W.group_timeouts())

    step_fn.student.forward = nan_from_step_2
    trainer.step_fn = SpyStep(step_fn, before=before)
    with pytest.raises(NonFiniteLossError, match=r"non-finite at step 2;.*ckpt-00000001\.pt"):
        trainer.fit()
    ckpts = list_checkpoints(tmp_path / "runs" / "nan" / "checkpoints")
    assert [s for s, _ in ckpts] == [1]
    saved = load_file(ckpts[0][1])
    for part in ("encoder", "predictor", "target_encoder"):
        assert saved[part].keys() == after_1[part].keys()
        assert all(torch.equal(saved[part][k], v) for k, v in after_1[part].items()), part
    assert not torch.distributed.is_initialized()  # the run left its process group
    assert len(timeouts) >= 2 and timeouts == [37.0] * len(timeouts)


def test_a_locked_run_folder_is_refused_and_the_process_group_is_left(tmp_path, clean_launcher_env):
    """FSDP2 starts a process group in a world of one too: a refusal (the run folder in use) leaves it."""
    from ijepa_fast.train.run_folder import RunLockedError
    from ijepa_fast.train.trainer import Trainer
    from tests.test_trainer import held_run_folder, tiny_overrides, write_idx

    data = write_idx(tmp_path / "data", n=16)
    cfg = config_mod_load(tiny_overrides(data, tmp_path / "runs", "locked", **{"run.engine": "fsdp2"}))
    refused = pytest.raises(RunLockedError, match=f"in use by pid {os.getpid()}")
    with held_run_folder(tmp_path / "runs", "locked") as run_dir, refused:
        Trainer(cfg)
    assert not torch.distributed.is_initialized()
    assert not (run_dir / "fsdp2").exists() and not (run_dir / "config.yaml").exists()


def test_the_online_probe_is_refused_as_under_zero3_and_the_process_group_is_left(tmp_path, clean_launcher_env):
    """FSDP2 shards the target encoder, which the probe runs on rank 0 alone: with more ranks that
    forward would gather shards from ranks that are not there. Refused in one line, before step 0."""
    from ijepa_fast.runtime.errors import ConfigError
    from ijepa_fast.train.trainer import Trainer
    from tests.test_trainer import tiny_overrides, write_idx

    data = write_idx(tmp_path / "data", n=16)
    probe = {"run.engine": "fsdp2", "online_probe.every": 1, "online_probe.root": str(data)}
    with pytest.raises(ConfigError, match="online_probe.every: not with the fsdp2 engine"):
        Trainer(config_mod_load(tiny_overrides(data, tmp_path / "runs", "probe", **probe)))
    assert not torch.distributed.is_initialized()


def config_mod_load(overrides: list[str]):
    from ijepa_fast import config

    return config.load(None, overrides)


def test_the_launch_layout_line_names_fsdp2_without_a_zero_stage():
    from ijepa_fast.cli.launch_plan import layout

    cfg = config_mod_load(["run.engine=fsdp2", "data.batch_size=64"])
    line = layout(cfg, "fsdp2", 2, 8, "gpu01:29500", 600)
    assert "global batch 1024 = 64 per rank x 16 ranks x 1 accumulation; engine fsdp2; collective timeout" in line
    assert "ZeRO" not in line


@pytest.mark.parametrize(
    "override, message",
    [("run.dtype=fp16", "needs a GradScaler"), ("speed.fp8_target=rowwise", "shards the target encoder")],
)
def test_what_fsdp2_cannot_run_is_refused_in_one_line_before_sharding(override, message):
    """fp16 without a GradScaler would train on overflowing gradients; a float8 copy made from one
    rank's shard would be another function: both are refused before any process group is needed."""
    from ijepa_fast import config as config_mod
    from ijepa_fast.runtime.errors import ConfigError
    from ijepa_fast.train.build import build_engine
    from tests.test_trainer import tiny_overrides

    cfg = config_mod.load(None, [*tiny_overrides(Path("data"), Path("runs"), "x"), "run.engine=fsdp2", override])
    with pytest.raises(ConfigError, match=message) as err:
        build_engine(cfg, torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.device("cpu"))
    assert "\n" not in str(err.value)
