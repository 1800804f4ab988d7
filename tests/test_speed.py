"""Optimisation switches: every combination runs, the authors' preset computes the same
loss, compiled blocks agree with eager ones."""

from __future__ import annotations

import itertools

import pytest
import torch

from ijepa_fast import config as config_mod
from ijepa_fast.kernels import _dispatch as dispatch
from ijepa_fast.masks.sampler import MultiBlockMaskSampler
from ijepa_fast.models.vit import VisionTransformer, compile_blocks
from ijepa_fast.train.build import build_train_step

TINY = [
    "model.name=vit_tiny",
    "model.patch_size=8",
    "model.pred_depth=1",
    "model.pred_emb_dim=48",
    "data.crop_size=32",
    "mask.min_keep=2",
    "run.device=cpu",
    "optim.epochs=1",
    "optim.warmup_epochs=0",
    "run.dtype=fp32",  # the tolerances below are fp32's; auto would take bf16 on a CPU with native bf16
]


def batch(B=4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, 3, 32, 32, generator=g), MultiBlockMaskSampler(4, min_keep=2, seed=0)(B, step=0)


def losses(overrides, steps=3):
    torch.manual_seed(0)
    step = build_train_step(config_mod.load(None, TINY + overrides), torch.device("cpu"), steps_per_epoch=10)
    images, masks = batch()
    return torch.stack([step(images, masks, i)["loss"] for i in range(steps)])


def test_authors_preset_gives_the_default_loss():
    torch.testing.assert_close(losses(["speed.preset=authors"]), losses([]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("engine", ["deepspeed", "fsdp2"])
@pytest.mark.parametrize("override", ["speed.grad_scaler=true", "speed.preset=authors"])
def test_a_grad_scaler_under_a_sharded_engine_is_refused_in_one_line_before_it_loads(engine, override, monkeypatch):
    """The sharded engines have no GradScaler: a run that asked for one, itself or through the
    authors' preset, is told so instead of training without it."""
    import sys

    from ijepa_fast.config import ConfigError
    from ijepa_fast.train.build import build_engine

    monkeypatch.setitem(sys.modules, "deepspeed", None)  # refused before the engine's package is needed
    cfg = config_mod.load(None, [*TINY, f"run.engine={engine}", override])
    with pytest.raises(ConfigError, match=f"speed.grad_scaler=true: the {engine} engine has no GradScaler") as err:
        build_engine(cfg, torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.device("cpu"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("engine", ["auto", "plain", "fsdp2"])
def test_a_deepspeed_json_for_a_run_deepspeed_does_not_train_is_refused_in_one_line(engine, tmp_path):
    """run.ds_config under another engine (run.engine=auto in one process is the plain engine) would
    be dropped without a word; the refusal names the engine the run got and the way to DeepSpeed."""
    from ijepa_fast.config import ConfigError
    from ijepa_fast.train.build import build_engine

    path = tmp_path / "ds.json"
    path.write_text("{}")
    cfg = config_mod.load(None, [*TINY, f"run.engine={engine}", f"run.ds_config={path}"])
    got = "plain" if engine == "auto" else engine
    with pytest.raises(ConfigError, match=f"read by the DeepSpeed engine only, and this run's engine is {got}") as err:
        build_engine(cfg, torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.device("cpu"))
    assert "run.engine=deepspeed" in str(err.value) and "\n" not in str(err.value)


SWITCHES = [
    "speed.fused_ema",
    "speed.fused_gather",
    "speed.fused_optimizer",
    "speed.grad_scaler",
    "speed.sync_every_step",
]


@pytest.mark.parametrize("values", list(itertools.product([False, True], repeat=len(SWITCHES)))[::3])
@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_switch_combinations_run_a_step(values, attention):
    overrides = [f"{k}={v}" for k, v in zip(SWITCHES, values)] + [f"speed.attention={attention}"]
    out = losses(overrides, steps=1)
    assert torch.isfinite(out).all()


def test_activation_checkpointing_gives_the_same_losses():
    torch.testing.assert_close(losses(["speed.activation_checkpointing=true"]), losses([]), rtol=1e-6, atol=1e-7)


def test_compiled_blocks_agree_with_eager():
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
    images = torch.randn(2, 3, 32, 32)
    ref = enc(images)
    weight = torch.randn_like(ref)  # (a sum of squares of LayerNorm outputs would be constant: zero gradient)
    ref_grads = torch.autograd.grad((ref * weight).sum(), [p for p in enc.parameters() if p.requires_grad])
    compile_blocks(enc)
    out = enc(images)
    grads = torch.autograd.grad((out * weight).sum(), [p for p in enc.parameters() if p.requires_grad])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())  # fp32 reassociation


# Everything that brings a tensor's values to the host (on CUDA: waits for the tensor's stream).
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


def host_events(overrides: list[str], monkeypatch) -> tuple[list[str], object]:
    """The host reads, device synchronizes, optimizer steps and gradient zeroings of one training
    step (the second: the first creates the optimizer's state), in the order they happen."""
    torch.manual_seed(0)
    step = build_train_step(config_mod.load(None, TINY + overrides), torch.device("cpu"), steps_per_epoch=10)
    images, masks = batch()
    step(images, masks, 0)
    opt, events = step.optimizer, []
    # AdamW's step counters live on the host unless it is fused or capturable: reading them waits for nothing.
    counters = {id(state["step"]) for state in opt.state.values() if "step" in state}

    def spy(method):
        def read(self, *args, **kwargs):
            if id(self) not in counters:
                events.append("read")
            return method(self, *args, **kwargs)

        return read

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, spy(getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch.cpu, "synchronize", lambda device=None: events.append("synchronize"))
    zero_grad = opt.zero_grad
    monkeypatch.setattr(opt, "zero_grad", lambda *a, **k: (events.append("zero_grad"), zero_grad(*a, **k))[1])
    opt.register_step_pre_hook(lambda *args: events.append("optimizer step"))
    step(images, masks, 1)
    monkeypatch.undo()
    return events, step


@pytest.fixture
def one_thread():
    """Tiny steps on a shared 2-core machine: one intra-op thread takes 0.2 s a step where two took
    seconds (OpenMP threads spinning against other processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_authors_preset_waits_for_the_device_where_the_authors_loop_does(monkeypatch, one_thread):
    """GradScaler's found-inf read, then the optimizer step, then one read per encoder weight
    (grad_logger: not biases, not 1-D parameters) before zero_grad, then the loss and a synchronize."""
    events, step = host_events(["speed.preset=authors"], monkeypatch)
    weights = [
        n
        for n, p in step.student.encoder.named_parameters()
        if p.requires_grad and not (n.endswith(".bias") or p.ndim == 1)
    ]
    assert len(weights) == 4 * len(step.student.encoder.blocks) + 1  # qkv, proj, fc1, fc2 per block; patch_embed
    assert events == ["read", "optimizer step", *["read"] * len(weights), "zero_grad", "read", "synchronize"]
    assert len(step.last_grad_norms) == len(weights)


def test_default_preset_never_waits_for_the_device(monkeypatch, one_thread):
    # On a CPU the kernels run their reference, which checks the index range (a read); the Triton
    # launch on CUDA skips that check.
    monkeypatch.setattr(dispatch, "check_range", lambda *args, **kwargs: None)
    events, _ = host_events([], monkeypatch)
    assert events == ["optimizer step", "zero_grad"]


def test_fp16_with_its_grad_scaler_never_waits_for_the_device(monkeypatch, one_thread):
    """run.dtype=fp16: the GradScaler hands its found-inf flag to the fused AdamW and updates its scale
    on the device, and the EMA takes the flag as a tensor: no host read is added."""
    monkeypatch.setattr(dispatch, "check_range", lambda *args, **kwargs: None)
    events, step = host_events(["run.dtype=fp16"], monkeypatch)
    assert step.engine.scaler is not None and step.amp_dtype == torch.float16
    assert events == ["optimizer step", "zero_grad"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["auto", "fp16"])
def test_default_step_on_cuda_never_synchronizes(dtype):
    """CUDA's sync debug mode raises on any call that waits for the device: a default step makes none
    (the Triton kernels, fused AdamW, the EMA), once its first step has created the optimizer's state."""
    device = torch.device("cuda")
    cfg = config_mod.load(None, [*TINY, "run.device=cuda", "speed.compile=off", f"run.dtype={dtype}"])
    torch.manual_seed(0)
    step = build_train_step(cfg, device, steps_per_epoch=10)
    images, masks = batch()
    images, masks = images.to(device), masks.to(device)
    step(images, masks, 0)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = step(images, masks, 1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out["loss"]).item()
