"""The step model against hand arithmetic on a tiny shape (every number below is worked out by hand
from the module docstring's table, not by calling the model), and its tables."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ijepa_fast import config as config_mod
from ijepa_fast.bench.predict import model_table, predicted_vs_measured
from ijepa_fast.config import AUTHORS_SPEED
from ijepa_fast.models.step_model import Cost, DeviceModel, Shape, Switches, step_costs

# 2 images of 8 x 8 px in 4 x 4 patches: N = 4 tokens; width 8, MLP 32, one block, 2 heads;
# predictor width 4, MLP 16, one block; context 2 tokens, one target block of 1 token.
TINY = Shape(
    batch=2, img=8, tokens=4, kc=2, kt=1, masks=1, width=8, hidden=32, depth=1, heads=2, patch=4,
    pred_width=4, pred_hidden=16, pred_depth=1,
)  # fmt: skip
# encoder parameters: patch embedding 3*16*8 + 8 = 392; block linears 4*64 + 2*8*32 + (24 + 8 + 32 + 8) = 840;
# LayerNorms 2*8 * 3 = 48: 1280. Block linears alone: 840; what autocast casts (no LayerNorms): 1232.
ENC, LINEARS, CAST = 1280, 840, 1232


def test_parameter_counts_by_hand():
    assert TINY.encoder_params == ENC and TINY.depth * TINY.block_linear_params(8, 32) == LINEARS
    assert TINY.encoder_matmul_params == CAST


def test_the_default_target_forward_by_hand():
    c = step_costs(TINY, Switches())["target_fwd"]
    # linears 8 rows * (8*64 + 4*8*32) = 12288, patch embedding 2*2*4*48*8 = 6144
    assert c.gemm_flops == 12288 + 6144 and c.fp8_flops == 0
    assert c.attention_flops == 2 * 4 * 16 * 8  # 2 sequences of 4 tokens: 4 T^2 W each
    # per token: LN1 (4+2)*8 = 48, add + LN2 2*(4+2)*8 = 96, bias + GELU 2*2*32 = 128, add (8+2)*8 = 80:
    # 352 * 8 tokens; the weights' casts 6 * 1232; final norm and targets 2*4*8 * (4+4+4+4) = 1024
    assert c.hbm_bytes == 352 * 8 + 6 * CAST + 1024


def test_each_switch_changes_what_the_docstring_says_by_hand():
    base = step_costs(TINY, Switches())
    fused = step_costs(TINY, Switches(fused_epilogue=True))
    assert base["target_fwd"].hbm_bytes - fused["target_fwd"].hbm_bytes == (352 - 96) * 8  # LN1 + LN2 remain
    copy = step_costs(TINY, Switches(bf16_target_copy=True))
    assert base["target_fwd"].hbm_bytes - copy["target_fwd"].hbm_bytes == 6 * CAST
    assert copy["ema"].hbm_bytes - base["ema"].hbm_bytes == 2 * ENC
    bf16 = step_costs(TINY, Switches(bf16_residual=True))
    # r = 2: per token 4*8 + 2*4*8 + 128 + 6*8 = 272; targets 2*4*8 * (2+4+4+4) = 896
    assert bf16["target_fwd"].hbm_bytes == 272 * 8 + 6 * CAST + 896
    row = step_costs(TINY, Switches(fp8_target="rowwise"))
    # the linears at the fp8 peak; patch embedding cast only (6 * 392); quantisation per token:
    # attention output (2+1)*8 = 24, LN1 and LN2 write 1 byte less per element (-16), GELU too (-32)
    assert row["target_fwd"].fp8_flops == 12288 and row["target_fwd"].gemm_flops == 6144
    assert row["target_fwd"].hbm_bytes == (352 + 24 - 16 - 32) * 8 + 6 * 392 + 1024
    assert row["ema"].hbm_bytes - base["ema"].hbm_bytes == 9 * LINEARS
    tensor = step_costs(TINY, Switches(fp8_target="tensorwise"))
    assert tensor["target_fwd"].hbm_bytes == (352 + 5 * (3 * 8 + 32)) * 8 + 6 * 392 + 1024  # (2a+1)(3D+F)
    pixels = 2 * 3 * 64
    assert step_costs(TINY, Switches(), real_loader=True)["data"] == Cost(h2d_bytes=4 * pixels)
    assert step_costs(TINY, Switches(uint8_input=True), real_loader=True)["data"] == Cost(hbm_bytes=5 * pixels)
    assert step_costs(TINY, Switches(uint8_input=True))["data"] == Cost()  # synthetic batches: nothing to copy


def test_milliseconds_from_round_numbers():
    dev = DeviceModel(
        "round", 1.0, 2.0, 1000.0, 10.0, gemm_efficiency=0.5, attention_efficiency=0.25, memory_efficiency=0.5,
        launch_us=10, sync_us=100,
    )  # fmt: skip
    cost = Cost(
        gemm_flops=1e12, fp8_flops=1e12, attention_flops=1e12, hbm_bytes=1e12, h2d_bytes=1e10, launches=100, syncs=10
    )
    # 2000 + 1000 + 4000 + 2000 + 1000 ms, plus 1 ms of launches and 1 ms of syncs
    assert cost.ms(dev) == pytest.approx(10002.0)


def test_the_authors_preset_is_priced_uncompiled_with_its_habits():
    sw = Switches.from_speed({**AUTHORS_SPEED, "preset": "authors"})
    assert not sw.compiled and sw.math_attention and not sw.fused_ema and sw.sync_every_step
    assert Switches.from_speed({"compile": "auto"}, device_type="cuda").compiled
    costs = step_costs(TINY, sw)
    # one block, uncompiled: LN (4+4+4+2)*8 twice, adds (8+2)*8 twice, GELU 2*2*32; scores 2*2*16 * 16 bytes
    assert costs["target_fwd"].hbm_bytes == (2 * 112 + 2 * 80 + 128) * 8 + 64 * 16 + 6 * CAST + 1024
    assert costs["sync"].syncs == 2 and costs["optimizer"].syncs == 4 + 1 + 1  # norms, GradScaler
    assert costs["ema"].launches == 3 * (12 + 5)


def test_the_table_prices_the_default_and_every_switch():
    table = model_table(config_mod.load(None, ["model.name=vit_tiny", "data.batch_size=8", "model.pred_depth=2"]))
    for name in ("default", "fused_epilogue", "fp8_target=rowwise", "bf16_target_copy", "bf16_residual", "uint8_input"):
        assert f"| + {name}" in table or f"| {name}" in table, name
    assert "989.4" in table and "3350" in table  # the peaks it assumes are printed


def test_predicted_beside_measured_for_every_row_with_a_phase_split():
    row = dict(name="all on (default)", speed={"preset": "fast"}, ok=True, mean_kc=40.0, mean_kt=10.0,
               num_pred_masks=4, step_ms_median=12.0, phases_ms={"target_fwd": 5.0, "backward": 4.0})  # fmt: skip
    result = {"meta": {"spec": {"config": "", "overrides": ["model.name=vit_tiny"]}, "loader": "synthetic"}}
    result["rows"] = [row, replace_row(row, ok=False), replace_row(row, phases_ms={})]
    lines = predicted_vs_measured(result)
    assert len([x for x in lines if x.startswith("| all on")]) == 3 - 2 and "/ 5.0 |" in lines[-1]
    assert "/ 12.0 |" in lines[-1]


def replace_row(row: dict, **changes) -> dict:
    return {**row, **changes}


def test_switches_takes_every_key_it_models_from_a_speed_section():
    sw = Switches.from_speed(
        {"fp8_target": "tensorwise", "fused_epilogue": True, "bf16_residual": True, "compile": "on"}
    )
    assert sw == replace(Switches(), fp8_target="tensorwise", fused_epilogue=True, bf16_residual=True)
