"""Every kernel launch the step and the engines make compiles ahead of time for Hopper (sm_90) and
Ampere (sm_80), with Triton's real argument specialisation, and spills no register (kernels/aot.py).

The build runs in a subprocess (triton must import compiled there); one arch at the ViT-H/14 shapes
stays in the quick suite, both archs at both shape sets are marked slow.
"""

from __future__ import annotations

import pytest

from ijepa_fast.kernels import aot

from .conftest import aot_build

KERNELS = {"gather_add_kernel", "segment_sum_kernel", "norm_gather_kernel", "ema_kernel"}


def _assert_complete_and_no_spills(report: dict, archs: list[str], shape_sets: list[str]) -> None:
    rows = report["rows"]
    assert {r["arch"] for r in rows} == set(archs)
    wanted = {f"{s}: {label}" for s in shape_sets for label in aot.cases(s)}
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


def test_every_launch_compiles_for_hopper_at_vith14_shapes(tmp_path):
    report = aot_build(tmp_path, "--arch", "sm_90", "--shapes", "vith14")
    _assert_complete_and_no_spills(report, ["sm_90"], ["vith14"])
    rows = report["rows"]
    # Specialised as a GPU run would: PatchEmbed's tokens arrive in place (token stride 1, a constant),
    # the width 1280 and every fresh allocation divisible by 16.
    ctx = _row(rows, "gather_add_kernel", "vith14: context gather+pos bf16 tokens, fp32 pos")
    assert "sxn=1" in ctx["constexprs"].split(", ")
    assert {"x_ptr", "pos_ptr", "out_ptr", "D", "sxd"} <= set(ctx["divisible_by_16"].split(", "))
    assert "x_ptr:*bf16" in ctx["signature"] and "pos_ptr:*fp32" in ctx["signature"]
    assert "HAS_OUT=True" in _row(rows, "ema_kernel", "vith14: ema fp32 <- fp32, bf16 copy")["constexprs"]
    # At these shapes every kernel has a contiguous, aligned operand: 128-bit loads throughout.
    assert {r["widest_load"] for r in rows} == {"v4"}


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
    spilling = aot.Build("ema_kernel", "sm_80", ["vith14: ema fp32 <- fp32"], "", "", "", 255, 8, 8, 0, 4, "v4")
    monkeypatch.setattr(aot, "capture", lambda shape_sets: [])
    monkeypatch.setattr(aot, "build", lambda launches, arch: [spilling])
    monkeypatch.setattr(aot, "meta", dict)
    assert aot.main(["--arch", "sm_80"]) == 1
    assert "registers spill in ema_kernel (sm_80: vith14: ema fp32 <- fp32)" in capsys.readouterr().err
