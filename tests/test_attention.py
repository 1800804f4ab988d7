"""Attention backends without a GPU: stub ``flash_attn``, ``flash_attn_interface`` and ``xformers.ops``
modules (attention computed with torch) stand in for the real packages.

Checked: a compiled block has no graph break whatever the backend (the backend's function is bound
at construction, not looked up in forward); each backend computes attention in its own layout; and
``auto`` picks by device, capability, installed packages and the dtype attention runs in.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

from ijepa_fast.models.attention import IMPLEMENTATIONS, Attention, resolve_backend
from ijepa_fast.models.vit import Block
from ijepa_fast.runtime import optional

STUB_PACKAGES = ("flash_attn", "flash_attn_interface", "xformers")


def _tokens_major_attention(q, k, v):
    """Attention on [B, N, H, Dh], the layout of flash_attn and xformers."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


@pytest.fixture
def stubs(monkeypatch):
    """Install the stub packages; returns name -> calls made to it. ``optional``'s cache is emptied
    before and after, so it sees the stubs and then forgets them."""
    calls = {name: 0 for name in STUB_PACKAGES}

    def counted(name, returns_lse=False):
        def fn(q, k, v):
            calls[name] += 1
            out = _tokens_major_attention(q, k, v)
            return (out, q.new_zeros(q.shape[:3])) if returns_lse else out  # some FA3 releases add the LSE

        return fn

    fa2 = types.ModuleType("flash_attn")
    fa2.flash_attn_func = counted("flash_attn")
    fa3 = types.ModuleType("flash_attn_interface")
    fa3.flash_attn_func = counted("flash_attn_interface", returns_lse=True)
    xformers, xops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")
    xops.memory_efficient_attention = counted("xformers")
    xformers.ops = xops
    for module in (fa2, fa3, xformers, xops):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    optional._try_import.cache_clear()
    yield calls
    optional._try_import.cache_clear()


def _uninstall(monkeypatch, *names):
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    optional._try_import.cache_clear()


def _capability(monkeypatch, major: int, minor: int = 0):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_compiled_block_has_no_graph_break(stubs, impl):
    torch._dynamo.reset()
    block = Block(dim=64, num_heads=4, mlp_ratio=2.0, attention=impl)
    explanation = torch._dynamo.explain(block)(torch.randn(2, 9, 64))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_every_backend_computes_attention_in_its_layout(stubs, impl):
    torch.manual_seed(0)
    attn = Attention(48, 4, backend=impl)
    x = torch.randn(2, 11, 48)
    out = attn(x)
    attn.backend = "math"
    torch.testing.assert_close(out, attn(x), rtol=1e-5, atol=1e-5)
    package = {"flash_attn": "flash_attn", "flash_attn3": "flash_attn_interface", "xformers": "xformers"}.get(impl)
    assert sum(stubs.values()) == (1 if package else 0) and (package is None or stubs[package] == 1)


def test_the_backend_is_bound_once_and_rebinds_when_set(stubs, monkeypatch):
    attn = Attention(32, 2, backend="flash_attn")
    _uninstall(monkeypatch, "flash_attn")  # forward no longer looks the package up
    attn(torch.randn(1, 5, 32))
    assert stubs["flash_attn"] == 1
    attn.backend = "sdpa"
    assert attn.backend == "sdpa" and attn(torch.randn(1, 5, 32)).shape == (1, 5, 32)
    with pytest.raises(optional.MissingDependencyError, match="flash_attn"):
        attn.backend = "flash_attn"
    with pytest.raises(ValueError, match="not one of"):
        Attention(32, 2, backend="flash")


HOPPER, AMPERE, TURING = (9, 0), (8, 0), (7, 5)
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize(
    ("device", "capability", "dtype", "missing", "head_dim", "expected"),
    [
        ("cpu", None, BF16, (), 80, "sdpa"),
        ("cpu", None, FP32, (), 80, "sdpa"),
        ("cuda", HOPPER, BF16, (), 80, "flash_attn3"),
        ("cuda", HOPPER, FP16, (), 24, "flash_attn"),  # FA3 would pad 24 to 64, FA2 to 32
        ("cuda", HOPPER, FP32, (), 80, "sdpa"),  # FlashAttention rejects fp32
        ("cuda", HOPPER, BF16, ("flash_attn_interface",), 80, "flash_attn"),
        ("cuda", HOPPER, BF16, ("flash_attn_interface", "flash_attn"), 80, "sdpa"),
        ("cuda", HOPPER, BF16, (), 84, "sdpa"),  # head width not a multiple of 8
        ("cuda", HOPPER, BF16, (), 264, "sdpa"),  # wider than 256
        ("cuda", AMPERE, BF16, (), 80, "flash_attn"),  # FA3 is Hopper-only
        ("cuda", AMPERE, FP32, (), 80, "sdpa"),
        ("cuda", TURING, BF16, (), 80, "sdpa"),  # FA2 needs Ampere or newer
    ],
)
def test_auto_picks_by_device_dtype_and_installed_packages(
    stubs, monkeypatch, device, capability, dtype, missing, head_dim, expected
):
    if capability is not None:
        _capability(monkeypatch, *capability)
    _uninstall(monkeypatch, *missing)
    assert resolve_backend("auto", device, head_dim, dtype) == expected


@pytest.mark.parametrize(
    ("capability", "missing", "expected"),
    [
        # the ViT-H/14 predictor (24), ViT-B/16 (64) and the ViT-H/14 encoder (80, both pad to 96)
        (HOPPER, (), {24: "flash_attn", 64: "flash_attn3", 80: "flash_attn3"}),
        (HOPPER, ("flash_attn",), {24: "sdpa", 64: "flash_attn3", 80: "flash_attn3"}),
        (AMPERE, (), {24: "flash_attn", 64: "flash_attn", 80: "flash_attn"}),
        (AMPERE, ("flash_attn",), {24: "sdpa", 64: "sdpa", 80: "sdpa"}),
    ],
)
def test_auto_picks_the_flash_attention_whose_kernels_suit_the_head_width(
    stubs, monkeypatch, capability, missing, expected
):
    """FlashAttention-3 has kernels for heads of 64, 96, 128, 192, 256; FlashAttention-2 also for
    32, 160 and 224. A head width FA3 pads wider than FA2 (24: 64 against 32, 2.7x the work) gets
    FA2, or sdpa when FA2 is missing; an explicit request still gets FA3 when it is all there is."""
    _capability(monkeypatch, *capability)
    _uninstall(monkeypatch, *missing)
    assert {hd: resolve_backend("auto", "cuda", hd, BF16) for hd in expected} == expected
    if capability == HOPPER and missing:
        assert resolve_backend("flash_attn", "cuda", 24, BF16) == "flash_attn3"


def test_requested_flash_attn_runs_fa3_on_hopper_and_says_why_it_cannot_serve(stubs, monkeypatch):
    _capability(monkeypatch, *HOPPER)
    assert resolve_backend("flash_attn", "cuda:0", 80, BF16) == "flash_attn3"
    with pytest.raises(ValueError, match=r"fp16/bf16 only.*use attention=sdpa"):
        resolve_backend("flash_attn", "cuda:0", 80, FP32)
    with pytest.raises(ValueError, match="only on CUDA"):
        resolve_backend("flash_attn", "cpu", 80, BF16)
    _capability(monkeypatch, *AMPERE)
    assert resolve_backend("flash_attn", "cuda:0", 80, BF16) == "flash_attn"
    _capability(monkeypatch, *TURING)
    with pytest.raises(ValueError, match=r"Ampere or newer GPU \(capability 8.0\+\), this one has 7.5"):
        resolve_backend("flash_attn", "cuda:0", 80, BF16)
    _uninstall(monkeypatch, "flash_attn", "flash_attn_interface")
    with pytest.raises(optional.MissingDependencyError, match=r"pip install 'ijepa_fast\[flash\]'"):
        resolve_backend("flash_attn", "cuda:0", 80, BF16)
