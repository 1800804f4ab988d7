"""Every kernel launch the step and the engines make compiles ahead of time for Hopper (sm_90) and
Ampere (sm_80), with Triton's real argument specialisation, spills no register, and reads the
step's operands 128 bits a thread at a time (kernels/aot.py).

The build runs in a subprocess (triton must import compiled there); one arch at the ViT-H/14 shapes
stays in the quick suite, both archs at both shape sets are marked slow.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ijepa_fast.kernels import aot
from ijepa_fast.models.vit import PatchEmbed

from .conftest import aot_build

KERNELS = {"gather_add_kernel", "segment_sum_kernel", "norm_gather_kernel", "ema_kernel"}


def _assert_complete_and_no_spills(
    report: dict, archs: list[str], shape_sets: list[str], contrast: bool = False
) -> None:
    rows = report["rows"]
    assert {r["arch"] for r in rows} == set(archs)
    wanted = {f"{s}: {label}" for s in shape_sets for label in aot.cases(s)}
    if contrast:
        wanted |= {f"{s}: {label}" for s in shape_sets for label in aot.contrast_cases(s)}
    for arch in archs:
        built = [r for r in rows if r["arch"] == arch]
        assert {case for r in built for case in r["cases"]} == wanted, f"{arch}: a use made no launch"
        assert {r["kernel"] for r in built} == KERNELS
    spilled = [(r["arch"], r["kernel"], r["cases"]) for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, f"registers spill: {spilled}"
    assert all(r["registers"] > 0 for r in rows)


def _row(rows: list[dict], kernel: str, case: str) -> dict:
    (row,) = [r for r in rows if r["kernel"] == kernel and case in r["cases"]]
    return row


def test_the_tokens_built_ahead_of_time_are_laid_out_as_patch_embed_returns_them():
    """PatchEmbed's tokens are contiguous [B, N, D] (its convolution runs channels-last), with the
    values of the convolution on the images as they come; the ahead-of-time build uses that layout."""
    embed = PatchEmbed(patch_size=2, embed_dim=8)
    images = torch.randn(3, 3, 4, 6)  # 2 x 3 patches
    tokens = embed(images)
    plain = F.conv2d(images, embed.proj.weight, embed.proj.bias, stride=2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens, plain)
    assert tokens.stride() == aot._patch_tokens(3, 6, 8, torch.float32).stride() == (48, 8, 1)
    assert plain.stride() == aot._transposed_tokens(3, 6, 8, torch.float32).stride() == (48, 1, 6)


def test_every_launch_compiles_for_hopper_at_vith14_shapes(tmp_path):
    report = aot_build(tmp_path, "--arch", "sm_90", "--shapes", "vith14", "--contrast")
    _assert_complete_and_no_spills(report, ["sm_90"], ["vith14"], contrast=True)
    rows = report["rows"]
    # Specialised as a GPU run would: PatchEmbed's tokens contiguous (feature stride 1, a constant),
    # the width 1280 and every fresh allocation divisible by 16.
    ctx = _row(rows, "gather_add_kernel", "vith14: context gather+pos bf16 tokens, fp32 pos")
    assert "sxd=1" in ctx["constexprs"].split(", ")
    assert {"x_ptr", "pos_ptr", "out_ptr", "D", "sxn"} <= set(ctx["divisible_by_16"].split(", "))
    assert "x_ptr:*bf16" in ctx["signature"] and "pos_ptr:*fp32" in ctx["signature"]
    # The step's gather reads its bf16 tokens and its fp32 positions 128 bits a thread at a time;
    # the convolution's own (transposed) layout would read each token feature alone, 16 bits.
    assert ctx["load_bits"]["x_ptr"] == ctx["load_bits"]["pos_ptr"] == 128
    transposed = _row(rows, "gather_add_kernel", "vith14: context gather+pos bf16 tokens transposed, fp32 pos")
    assert transposed["load_bits"]["x_ptr"] == 16 and transposed["load_bits"]["pos_ptr"] == 128
    assert "HAS_OUT=True" in _row(rows, "ema_kernel", "vith14: ema fp32 <- fp32, bf16 copy")["constexprs"]
    # Every operand the step's gathers read rows from, read 128 bits at a time.
    data = {"x_ptr", "pos_ptr", "h_ptr", "grad_ptr"}
    narrow = [
        (r["kernel"], r["cases"], name, bits)
        for r in rows
        if r is not transposed
        for name, bits in r["load_bits"].items()
        if name in data and bits != 128
    ]
    assert narrow == []


@pytest.mark.slow
def test_every_launch_compiles_for_hopper_and_ampere_at_every_shape(tmp_path):
    report = aot_build(tmp_path)
    _assert_complete_and_no_spills(report, list(aot.ARCHS), list(aot.SHAPE_SETS))
    odd_ema = _row([r for r in report["rows"] if r["arch"] == "sm_80"], "ema_kernel", "odd: ema fp32 <- bf16")
    assert "ALIGNED=False" in odd_ema["constexprs"]  # partitions at odd offsets take the unaligned variant


def test_ptxas_report_is_read_and_a_missing_one_is_an_error():
    log = (
        "ptxas info    : Function properties for k\n"
        "    0 bytes stack frame, 24 bytes spill stores, 16 bytes spill loads\n"
        "ptxas info    : Used 255 registers, used 1 barriers\n"
    )
    assert aot._ptxas_report(log, "k") == (255, 24, 16)
    with pytest.raises(RuntimeError, match="no ptxas resource report for k"):
        aot._ptxas_report("ptxas info    : 0 bytes gmem\n", "k")


def test_a_spill_fails_the_command_naming_the_kernel(monkeypatch, capsys):
    spilling = aot.Build("ema_kernel", "sm_80", ["vith14: ema fp32 <- fp32"], "", "", "", 255, 8, 8, 0, 4, "v4", {})
    monkeypatch.setattr(aot, "capture", lambda shape_sets, contrast: [])
    monkeypatch.setattr(aot, "build", lambda launches, arch: [spilling])
    monkeypatch.setattr(aot, "meta", dict)
    assert aot.main(["--arch", "sm_80"]) == 1
    assert "registers spill in ema_kernel (sm_80: vith14: ema fp32 <- fp32)" in capsys.readouterr().err


def test_load_widths_are_traced_to_the_pointer_each_address_offsets():
    """An address derived from a pointer parameter by arithmetic belongs to it; a value loaded from
    memory (an index) ties no later address to the array it came from."""
    ptx = """
    ld.param.b64 	%rd1, [k_param_0];
    ld.param.b64 	%rd2, [k_param_1];
    ld.param.b32 	%r1, [k_param_2];
    ld.param.b64 	%rd3, [k_param_3];
    mad.wide.s32 	%rd4, %r1, 2, %rd1;
    @%p1 ld.global.b16 { %rs1 }, [ %rd4 + 0 ];
    ld.global.b32 	%r2, [%rd3];
    mul.wide.s32 	%rd5, %r2, 4;
    add.s64 	%rd6, %rd2, %rd5;
    @%p2 ld.global.v4.b32 { %r3, %r4, %r5, %r6 }, [ %rd6 + 0 ];
    """
    bits = aot._load_bits(ptx, {0: "x_ptr", 1: "pos_ptr", 3: "idx_ptr"})
    assert bits == {"x_ptr": 16, "idx_ptr": 32, "pos_ptr": 128}
