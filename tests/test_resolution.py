"""Evaluation at another image size than training: the encoder's one forward pass resamples its
position embeddings bicubically, as Hugging Face's IJepa does with ``interpolate_pos_encoding=True``
(the reference here, on the same weights through ``export_hf``), and ``ijepa-eval`` /
``ijepa-extract --img-size N`` evaluate at N px."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ijepa_fast.cli import eval as eval_cli
from ijepa_fast.cli import export as export_cli
from ijepa_fast.eval.features import encode, extract_features
from ijepa_fast.io.hf import export_hf
from ijepa_fast.io.load import load_encoder
from ijepa_fast.models.pos_embed import interpolate_pos_embed
from ijepa_fast.models.vit import VisionTransformer
from tests.test_eval import write_idx_data, write_our_run

TRAIN_SIZE = 32


def random_encoder(patch: int, seed: int = 0) -> VisionTransformer:
    """A small encoder trained at 32 px whose weights are all away from their init (LayerNorms too),
    and whose position table is random, so that a wrong resampling cannot hide behind sin-cos smoothness."""
    torch.manual_seed(seed)
    enc = VisionTransformer(img_size=TRAIN_SIZE, patch_size=patch, embed_dim=64, depth=2, num_heads=4).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return enc


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    """(ours, transformers' IJepaModel on the same weights) per patch size."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    pairs = {}
    for patch in (8, 16):
        ours = random_encoder(patch, seed=patch)
        folder = export_hf(ours, tmp_path_factory.mktemp(f"hf{patch}"))
        pairs[patch] = (ours, transformers.IJepaModel.from_pretrained(str(folder), attn_implementation="eager").eval())
    return pairs


@pytest.mark.parametrize(
    ("patch", "height", "width"),
    [
        (8, 32, 32),  # the training size: the table as it is
        (8, 48, 48),  # 4x4 -> 6x6
        (8, 40, 40),  # 4x4 -> 5x5: not a whole multiple of the training grid
        (8, 24, 24),  # smaller: 3x3
        (8, 40, 56),  # rectangular: 5x7
        (16, 48, 48),  # 2x2 -> 3x3
        (16, 64, 32),  # rectangular: 4x2
    ],
)
def test_our_encoder_at_another_size_matches_transformers_interpolate_pos_encoding(hf_pair, patch, height, width):
    ours, theirs = hf_pair[patch]
    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(height * width))
    with torch.no_grad():
        got = ours(x)
        want = theirs(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
    assert got.shape == (2, (height // patch) * (width // patch), 64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_the_position_table_is_resampled_only_off_the_training_grid():
    enc = random_encoder(8)
    assert interpolate_pos_embed(enc.pos_embed, 4, (4, 4)) is enc.pos_embed
    # a 4x4 table that is linear in the row and the column: bicubic keeps the corners' average at the centre
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    table = torch.stack([rows, cols], -1).reshape(1, 16, 2)
    wide = interpolate_pos_embed(table, 4, (8, 8)).reshape(8, 8, 2)
    assert wide[..., 0].diff(dim=1).abs().max() == 0 and wide[..., 1].diff(dim=0).abs().max() == 0  # raster order
    assert wide[..., 0].mean().item() == pytest.approx(1.5) and wide[..., 1].mean().item() == pytest.approx(1.5)


def test_sizes_the_encoder_cannot_run_are_refused_with_the_reason():
    enc = random_encoder(8)
    with pytest.raises(ValueError, match="not a multiple of the patch size 8"):
        enc(torch.zeros(1, 3, 36, 32))
    with pytest.raises(ValueError, match="4x4 training grid"):  # masks index the training grid
        enc(torch.zeros(1, 3, 48, 48), torch.zeros(1, 3, dtype=torch.long))


def test_last4_features_come_from_the_same_pass_at_any_size():
    enc = VisionTransformer(img_size=TRAIN_SIZE, patch_size=8, embed_dim=64, depth=5, num_heads=4).eval()
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        last4 = encode(enc, x, "last4")
        assert torch.equal(last4[:, -64:], encode(enc, x, "avgpool"))  # the last part is forward's
        # the first part: the tokens after block 2 (of 5), through the final LayerNorm, pooled
        h = enc.embed(x)
        for blk in enc.blocks[:2]:
            h = blk(h)
        torch.testing.assert_close(last4[:, :64], enc.norm(h).mean(1), atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def demo_like(tmp_path_factory):
    """(a run folder of a vit_tiny at 28 px with patch 7, IDX data)."""
    root = tmp_path_factory.mktemp("res")
    return write_our_run(root / "run", depth=1), write_idx_data(root / "data", n_train=20, n_test=6)


def test_ijepa_extract_img_size_gives_the_features_of_the_resized_images(demo_like, tmp_path):
    from ijepa_fast.config import DataConfig
    from ijepa_fast.data.evaluation import build_eval_dataset

    run_dir, data = demo_like
    out = tmp_path / "f.npy"
    args = [str(run_dir), "--data", str(data), "--split", "test", "--out", str(out), "--no-progress", "--dtype", "fp32"]
    assert export_cli.extract_main([*args, "--img-size", "42"]) == 0  # 4x4 patches of 7 -> 6x6
    dataset = build_eval_dataset(DataConfig(dataset="idx", root=str(data), crop_size=42), split="test")
    assert dataset[0][0].shape == (3, 42, 42)
    ref, _ = extract_features(load_encoder(run_dir).encoder, dataset, progress=False, dtype="fp32")
    np.testing.assert_allclose(np.load(out), ref.numpy(), rtol=0, atol=1e-5)
    at_28, _ = extract_features(
        load_encoder(run_dir).encoder,
        build_eval_dataset(DataConfig(dataset="idx", root=str(data), crop_size=28), split="test"),
        progress=False,
        dtype="fp32",
    )
    assert not np.allclose(np.load(out), at_28.numpy(), atol=1e-3)  # another size, other features


def test_ijepa_eval_img_size_is_reported_and_a_bad_one_is_one_line(demo_like, tmp_path, capsys):
    run_dir, data = demo_like
    out = tmp_path / "r.json"
    base = [str(run_dir), "--data", str(data), "--no-progress", "--no-probe", "--k", "3", "--out", str(out)]
    assert eval_cli.main([*base, "--img-size", "35"]) == 0
    report = json.loads(out.read_text())
    assert report["img_size"] == 35 and report["model"]["img_size"] == "28"
    assert "35 px (trained at 28 px; position embeddings interpolated, bicubic)" in out.with_suffix(".md").read_text()
    assert "at 35 px" in capsys.readouterr().out
    assert eval_cli.main([*base, "--img-size", "30"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ijepa-eval: --img-size 30 must be a positive multiple of the patch size 7"]
