"""speed.fused_epilogue: the blocks compiled with Inductor's GEMM templates and epilogue fusion.

The kernels of one compiled block are counted in the code Inductor generates for it. On a CPU the
GEMM templates need weights frozen into constants (inference only), so the training block keeps
its four GEMMs and four elementwise kernels: the count a GPU's fused block has to beat, and the
numerics (forward and every gradient) against eager. On a GPU the fused block is counted and
compared in the same way (marked ``gpu``)."""

from __future__ import annotations

import re

import pytest
import torch

from ijepa_fast import config as config_mod
from ijepa_fast.config import ConfigError
from ijepa_fast.models import vit
from ijepa_fast.models.ijepa import models_from_config
from tests.test_speed import TINY


def kernels(code: str) -> dict[str, int]:
    """Kernel launches in Inductor's generated code, by kind (GEMM: library call or Triton/C++ template)."""
    calls = re.findall(r"^\s+(?:(\w+)\.run\(|(\w+)\(|(extern_kernels\.\w+)\()", code, flags=re.M)
    names = [a or b or c for a, b, c in calls]
    counts = {"gemm": 0, "template": 0, "elementwise": 0}
    for name in names:
        if name.startswith("extern_kernels.") and name.split(".")[1] in ("mm", "addmm", "bmm", "baddbmm"):
            counts["gemm"] += 1
        elif name.startswith(("triton_tem_", "cpp_fused_template", "cpp_CppMicroGemm")):
            counts["template"] += 1
        elif name.startswith(("cpp_fused_", "triton_poi_", "triton_red_", "triton_per_")):
            counts["elementwise"] += 1
    return counts


def compiled_block(device: str, dtype: torch.dtype | None, options: dict | None):
    """(eager outputs and gradients, compiled ones, forward code) of one block on 2 x 17 tokens of width 64."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    blk = vit.Block(64, 4, 4.0, "sdpa").to(device)
    x = torch.randn(2, 17, 64, device=device, requires_grad=True)
    w = torch.randn(2, 17, 64, device=device)
    params = [x, *blk.parameters()]

    def run(module):
        with torch.autocast(device, dtype, enabled=dtype is not None):
            out = module(x)
        return out, torch.autograd.grad((out.float() * w).sum(), params)

    eager = run(blk)
    torch._dynamo.reset()
    fused = torch.compile(blk, options=options)
    got, codes = run_and_get_code(lambda: run(fused))
    return eager, got, codes[0]


def test_the_config_asks_the_compiler_for_fused_epilogues(monkeypatch):
    seen = []
    monkeypatch.setattr(vit.Block, "compile", lambda self, **kw: seen.append(kw.get("options")))
    cfg = config_mod.load(None, [*TINY, "speed.compile=on", "speed.fused_epilogue=true"])
    models_from_config(cfg, torch.device("cpu"))
    assert seen and all(o == vit.FUSED_EPILOGUE_OPTIONS for o in seen)
    assert vit.FUSED_EPILOGUE_OPTIONS["epilogue_fusion"] and "TRITON" in vit.FUSED_EPILOGUE_OPTIONS[
        "max_autotune_gemm_backends"
    ].split(",")
    for key in vit.FUSED_EPILOGUE_OPTIONS:  # Inductor's own names (an unknown one would be refused at compile)
        assert hasattr(torch._inductor.config, key), key


def test_fused_epilogues_need_compile():
    with pytest.raises(ConfigError, match="speed.fused_epilogue=True is invalid: expected false when speed.compile"):
        config_mod.load(None, ["speed.compile=off", "speed.fused_epilogue=true"])


def test_on_the_cpu_the_block_compiled_for_fused_epilogues_is_eagers_function():
    eager, got, code = compiled_block("cpu", None, vit.FUSED_EPILOGUE_OPTIONS)
    torch.testing.assert_close(got[0], eager[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[1], eager[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())  # fp32 reassociation
    # qkv, proj, fc1, fc2 as library GEMMs; LayerNorm 1, residual add + LayerNorm 2, bias + GELU,
    # the last residual add (a bias that only adds is inside its GEMM: addmm)
    assert kernels(code) == {"gemm": 4, "template": 0, "elementwise": 4}, kernels(code)
    assert "erf" in code and "_addmm_activation" not in code  # the exact GELU, not cuBLASLt's tanh epilogue


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_the_gpu_the_gelu_and_residual_adds_run_inside_the_gemms():
    """Triton templates only (no cuBLAS choice), so the fusion is what is tested, not the autotuner's pick."""
    options = {**vit.FUSED_EPILOGUE_OPTIONS, "max_autotune_gemm_backends": "TRITON"}
    eager, got, code = compiled_block("cuda", torch.bfloat16, options)
    _, _, plain = compiled_block("cuda", torch.bfloat16, None)
    fused, unfused = kernels(code), kernels(plain)
    assert fused["template"] == 4 and fused["gemm"] == 0, fused
    assert fused["elementwise"] < unfused["elementwise"], (fused, unfused)
    assert "_addmm_activation" not in code
    torch.testing.assert_close(got[0].float(), eager[0].float(), rtol=2e-2, atol=2e-2)  # bf16 rounding, another order
    for a, b in zip(got[1], eager[1]):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 2e-2
