"""ViT encoder and predictor: sizes, the authors' names and shapes, init, forward semantics."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ijepa_fast.models.attention import Attention, attention_math, resolve_backend
from ijepa_fast.models.pos_embed import sincos_pos_embed_2d
from ijepa_fast.models.vit import VIT_SIZES, build_encoder, build_predictor, grid_size, vit_size
from ijepa_fast.runtime.device import autocast


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_vith14_parameter_counts_match_the_authors():
    with torch.device("meta"):
        enc = build_encoder("vit_huge", 224, 14)
        pred = build_predictor(enc, depth=12, embed_dim=384)
    assert count(enc) == 630_762_240  # ViT-H/14's count, position embedding included
    assert count(pred) == 22_377_728


@pytest.mark.parametrize("name", list(VIT_SIZES))
@pytest.mark.parametrize("patch,img", [(14, 224), (16, 224), (16, 448)])
def test_every_size_has_the_expected_shapes(name, patch, img):
    size = VIT_SIZES[name]
    with torch.device("meta"):
        enc = build_encoder(name, img, patch)
        pred = build_predictor(enc, depth=2, embed_dim=384)
    D, L, N = size.embed_dim, size.depth, (img // patch) ** 2
    hidden = int(D * size.mlp_ratio)
    per_block = (D * 3 * D + 3 * D) + (D * D + D) + (D * hidden + hidden) + (hidden * D + D) + 4 * D
    assert count(enc) == L * per_block + (3 * patch * patch * D + D) + N * D + 2 * D
    assert enc.pos_embed.shape == (1, N, D)
    assert len(enc.blocks) == L and enc.blocks[0].attn.num_heads == size.num_heads
    assert pred.predictor_proj.weight.shape == (D, 384)
    assert pred.predictor_blocks[0].attn.num_heads == size.num_heads  # the authors reuse the encoder's heads


def test_giant_mlp_ratio():
    assert int(1408 * vit_size("vit_giant").mlp_ratio) == 6144


def authors_key_shapes(D: int, depth: int, p: int, N: int, hidden: int) -> dict[str, tuple]:
    """The authors' encoder state-dict keys and shapes, written out from their released checkpoints' names."""
    keys = {
        "patch_embed.proj.weight": (D, 3, p, p),
        "patch_embed.proj.bias": (D,),
        "pos_embed": (1, N, D),
        "norm.weight": (D,),
        "norm.bias": (D,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update(
            {
                b + "norm1.weight": (D,),
                b + "norm1.bias": (D,),
                b + "attn.qkv.weight": (3 * D, D),
                b + "attn.qkv.bias": (3 * D,),
                b + "attn.proj.weight": (D, D),
                b + "attn.proj.bias": (D,),
                b + "norm2.weight": (D,),
                b + "norm2.bias": (D,),
                b + "mlp.fc1.weight": (hidden, D),
                b + "mlp.fc1.bias": (hidden,),
                b + "mlp.fc2.weight": (D, hidden),
                b + "mlp.fc2.bias": (D,),
            }
        )
    return keys


def test_state_dict_names_and_shapes_are_the_authors():
    enc = build_encoder("vit_tiny", 64, 16)
    got = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert got == authors_key_shapes(192, 12, 16, 16, 768)
    pred = build_predictor(enc, depth=2, embed_dim=96)
    names = set(pred.state_dict())
    for k in (
        "mask_token",
        "predictor_pos_embed",
        "predictor_embed.weight",
        "predictor_norm.weight",
        "predictor_proj.weight",
        "predictor_blocks.1.mlp.fc2.bias",
    ):
        assert k in names


def test_authors_style_checkpoint_loads_strictly():
    enc = build_encoder("vit_tiny", 64, 16)
    shapes = authors_key_shapes(192, 12, 16, 16, 768)
    ckpt = {"module." + k: torch.randn(s) for k, s in shapes.items()}  # DDP-prefixed, as released
    stripped = {k.removeprefix("module."): v for k, v in ckpt.items()}
    enc.load_state_dict(stripped, strict=True)
    assert torch.equal(enc.blocks[3].attn.qkv.weight, stripped["blocks.3.attn.qkv.weight"])


def reference_sincos(D: int, grid: int) -> np.ndarray:
    """Independent float64 formula: row-major patches; first half of channels encodes the column."""
    out = np.zeros((grid * grid, D))
    half, quarter = D // 2, D // 4
    for r in range(grid):
        for c in range(grid):
            for axis, coord in ((0, c), (1, r)):
                for i in range(quarter):
                    freq = 1.0 / 10000 ** (i / quarter)
                    out[r * grid + c, axis * half + i] = math.sin(coord * freq)
                    out[r * grid + c, axis * half + quarter + i] = math.cos(coord * freq)
    return out


def test_sincos_position_embedding_matches_the_formula():
    np.testing.assert_allclose(sincos_pos_embed_2d(16, 5), reference_sincos(16, 5), rtol=0, atol=1e-12)
    enc = build_encoder("vit_tiny", 32, 8)
    assert not enc.pos_embed.requires_grad
    torch.testing.assert_close(enc.pos_embed[0].double(), torch.from_numpy(reference_sincos(192, 4)), rtol=0, atol=1e-6)


def _authors_training_init(module: torch.nn.Module) -> None:
    """The authors' ``init_model`` (src/helper.py), run after their model classes are built: every
    Linear redrawn at std 0.02 with zero biases, every LayerNorm 1/0."""
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.trunc_normal_(m.weight, std=0.02)
            torch.nn.init.zeros_(m.bias)
        elif isinstance(m, torch.nn.LayerNorm):
            torch.nn.init.ones_(m.weight)
            torch.nn.init.zeros_(m.bias)


def _spread(module: torch.nn.Module) -> dict[str, float]:
    return {n: p.std().item() for n, p in module.named_parameters() if p.dim() > 1 and "pos_embed" not in n}


@pytest.mark.parametrize("which", ["encoder", "predictor"])
def test_initialisation_is_the_authors_training_init(which):
    """Every weight's spread equals what the authors' training starts from (their classes, then
    init_model): no depth scaling of the output projections, which init_model undoes."""
    torch.manual_seed(0)
    enc = build_encoder("vit_small", 224, 16)
    ours = enc if which == "encoder" else build_predictor(enc, depth=6)
    reference = copy.deepcopy(ours)
    _authors_training_init(reference)
    got, want = _spread(ours), _spread(reference)
    assert got.keys() == want.keys() and len(got) > 20
    for name in got:  # 384-wide matrices: the spread of one draw is within 5% of its std
        assert abs(got[name] - want[name]) < 0.05 * want[name], (name, got[name], want[name])
    blocks = ours.blocks if which == "encoder" else ours.predictor_blocks
    assert abs(blocks[-1].attn.proj.weight.std().item() - 0.02) < 0.002  # not 0.02 / sqrt(2 * depth)
    w = blocks[0].mlp.fc1.weight
    # trunc_normal_(std=0.02) truncates at +-2 in absolute terms (as the authors' timm-style init), so the
    # weights are normal in practice: check that nothing is beyond the absolute bounds.
    assert w.abs().max() <= 2.0 and torch.all(blocks[0].mlp.fc1.bias == 0) and torch.all(blocks[0].norm1.weight == 1)


def test_depth_scaled_init_divides_the_output_projections_by_sqrt_2_layer():
    torch.manual_seed(0)
    enc = build_encoder("vit_small", 224, 16, depth_scaled_init=True)
    pred = build_predictor(enc, depth=6, depth_scaled_init=True)
    for blocks, layers in ((enc.blocks, (1, 4, 12)), (pred.predictor_blocks, (1, 6))):
        for i in layers:
            for weight in (blocks[i - 1].attn.proj.weight, blocks[i - 1].mlp.fc2.weight):
                assert abs(weight.std().item() - 0.02 / math.sqrt(2 * i)) < 0.1 * 0.02 / math.sqrt(2 * i)
            assert abs(blocks[i - 1].attn.qkv.weight.std().item() - 0.02) < 0.002


def test_the_run_config_reaches_the_init():
    from ijepa_fast import config as config_mod
    from ijepa_fast.models.ijepa import build_models

    for scaled in (False, True):
        cfg = config_mod.load(None, ["model.name=vit_tiny", f"model.depth_scaled_init={scaled}"])
        torch.manual_seed(0)
        student, _ = build_models(cfg.model, 224)
        std = student.encoder.blocks[-1].mlp.fc2.weight.std().item()
        want = 0.02 / math.sqrt(2 * 12) if scaled else 0.02
        assert abs(std - want) < 0.1 * want


def test_bad_sizes_are_named():
    with pytest.raises(ValueError, match="patch size 14 does not divide the image size 100"):
        grid_size(100, 14)
    with pytest.raises(ValueError, match="unknown model name 'vit_hug'"):
        build_encoder("vit_hug", 224, 16)


def manual_encoder(enc, images, idx=None):
    """Plain re-statement of the authors' encoder forward (math attention, explicit gather)."""
    x = F.conv2d(images, enc.patch_embed.proj.weight, enc.patch_embed.proj.bias, stride=enc.patch_embed.proj.stride)
    x = x.flatten(2).transpose(1, 2) + enc.pos_embed
    if idx is not None:
        x = torch.stack([x[b, idx[b]] for b in range(x.shape[0])])
    for blk in enc.blocks:
        h = F.layer_norm(x, (x.shape[-1],), blk.norm1.weight, blk.norm1.bias, 1e-6)
        B, N, D = h.shape
        H = blk.attn.num_heads
        qkv = F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias).reshape(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
        att = (qkv[0] @ qkv[1].transpose(-2, -1) / math.sqrt(D // H)).softmax(-1) @ qkv[2]
        x = x + F.linear(att.transpose(1, 2).reshape(B, N, D), blk.attn.proj.weight, blk.attn.proj.bias)
        h = F.layer_norm(x, (D,), blk.norm2.weight, blk.norm2.bias, 1e-6)
        hidden = F.gelu(F.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias))
        x = x + F.linear(hidden, blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    return F.layer_norm(x, (x.shape[-1],), enc.norm.weight, enc.norm.bias, 1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_encoder_forward_matches_a_plain_restatement(fused):
    torch.manual_seed(0)
    enc = build_encoder("vit_tiny", 32, 8, fused_gather=fused).double()
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    idx = torch.tensor([[0, 2, 5, 9, 15], [1, 2, 3, 4, 5], [15, 14, 0, 7, 8]])
    torch.testing.assert_close(enc(images), manual_encoder(enc, images))
    torch.testing.assert_close(enc(images, idx), manual_encoder(enc, images, idx))


def manual_predictor(pred, ctx, ctx_idx, tgt_idx):
    """The authors' per-block formulation: run the predictor once per target block, concatenate."""
    outs = []
    for m in range(tgt_idx.shape[0]):
        rows = []
        for b in range(ctx.shape[0]):
            x = pred.predictor_embed(ctx[b]) + pred.predictor_pos_embed[0, ctx_idx[b]]
            q = pred.mask_token[0] + pred.predictor_pos_embed[0, tgt_idx[m, b]]
            h = torch.cat([x, q])[None]
            for blk in pred.predictor_blocks:
                h = blk(h)
            rows.append(pred.predictor_proj(pred.predictor_norm(h))[0, x.shape[0] :])
        outs.append(torch.stack(rows))
    return torch.cat(outs)  # (M*B, Kt, D)


@pytest.mark.parametrize("fused", [True, False])
def test_predictor_batched_pass_equals_per_block_runs(fused):
    torch.manual_seed(0)
    enc = build_encoder("vit_tiny", 32, 8)
    pred = build_predictor(enc, depth=2, embed_dim=96, fused_gather=fused).double()
    ctx_idx = torch.tensor([[0, 1, 2, 5], [3, 4, 8, 9]])
    tgt_idx = torch.tensor([[[10, 11], [12, 13]], [[14, 15], [6, 7]], [[10, 14], [0, 1]]])  # M=3, B=2, K=2
    ctx = torch.randn(2, 4, 192, dtype=torch.float64)
    out = pred(ctx, ctx_idx, tgt_idx)
    assert out.shape == (6, 2, 192)
    torch.testing.assert_close(out, manual_predictor(pred, ctx, ctx_idx, tgt_idx))


@pytest.mark.parametrize("head_dim", [24, 64, 80, 88])
def test_sdpa_matches_math_attention(head_dim):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, head_dim, requires_grad=True) for _ in range(3))
    ref = attention_math(q.double(), k.double(), v.double())
    out = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g.double())
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-5)


def aten_ops(fn, *inputs: torch.Tensor) -> list[str]:
    """The ATen ops that forward and backward of ``fn(*inputs)`` run, in order."""
    ops = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with Record():
        out = fn(*inputs)
        torch.autograd.grad(out, inputs, torch.ones_like(out))
    return ops


def authors_attention(q, k, v):
    """facebookresearch/ijepa, src/models/vision_transformer.py:143-147 (without the dropout of p=0)."""
    attn = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    attn = attn.softmax(dim=-1)
    return attn @ v


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_math_attention_runs_the_authors_ops(amp):
    """The math backend costs what the authors' attention costs: the same ops forward and backward,
    under autocast too (no extra casts of q, k, v)."""
    q, k, v = (torch.randn(2, 3, 17, 16, dtype=amp or torch.float32, requires_grad=True) for _ in range(3))
    with autocast(torch.device("cpu"), amp):
        ours, theirs = aten_ops(attention_math, q, k, v), aten_ops(authors_attention, q, k, v)
    assert ours == theirs and "aten._softmax" in ours


def test_attention_module_backends_agree_and_names_do_not_change():
    torch.manual_seed(0)
    a = Attention(96, 4, backend="sdpa")
    x = torch.randn(2, 11, 96)
    ref = a(x)
    a.backend = "math"
    torch.testing.assert_close(a(x), ref, atol=1e-5, rtol=1e-5)
    assert set(a.state_dict()) == {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"}


def test_missing_or_unfit_backends_are_errors():
    with pytest.raises(ValueError, match="not a backend"):
        resolve_backend("flash", "cpu", 64, torch.float32)
    assert resolve_backend("auto", "cpu", 80, torch.float32) == "sdpa"
    with pytest.raises((ValueError, ImportError), match="flash_attn"):
        resolve_backend("flash_attn", "cpu", 64, torch.bfloat16)
