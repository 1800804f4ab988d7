"""Frozen-feature evaluation: features (avgpool, last4), the linear probe, kNN, and ijepa-eval end to end."""

from __future__ import annotations

import gzip
import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ijepa_fast import config as config_mod
from ijepa_fast.cli import eval as cli
from ijepa_fast.eval import attentive
from ijepa_fast.eval.attentive import AttentiveProbe, attentive_probe
from ijepa_fast.eval.features import encode, extract_features, extract_tokens
from ijepa_fast.eval.knn import knn_accuracy, knn_predict, knn_topk
from ijepa_fast.eval.lowshot import LowShot, label_subset
from ijepa_fast.eval.probe import fit_softmax_regression, linear_probe, whiten
from ijepa_fast.io import checkpoint as ckpt_mod
from ijepa_fast.models.ijepa import build_models
from ijepa_fast.models.vit import build_encoder
from tests.test_cli import one_error_line

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers (also used by test_interop)


def write_idx_split(root: Path, split: str, n: int, seed: int) -> None:
    """An IDX pair (magic 0x803 images uint8 [n, 28, 28], 0x801 labels): 4 classes of blobs, one per quadrant."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    labels = rng.integers(0, 4, n).astype(np.uint8)
    cy = np.where(labels % 2 == 0, 8.0, 20.0) + rng.normal(0, 1.5, n)
    cx = np.where(labels < 2, 8.0, 20.0) + rng.normal(0, 1.5, n)
    imgs = 255 * np.exp(-((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2) / 18.0)
    prefix = "train" if split == "train" else "t10k"
    root.mkdir(parents=True, exist_ok=True)
    with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(struct.pack(">IIII", 0x00000803, n, 28, 28) + imgs.astype(np.uint8).tobytes())
    with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(struct.pack(">II", 0x00000801, n) + labels.tobytes())


def write_idx_data(root: Path, n_train: int = 160, n_test: int = 48) -> Path:
    write_idx_split(root, "train", n_train, seed=0)
    write_idx_split(root, "test", n_test, seed=1)
    return root


def write_our_run(run_dir: Path, depth: int = 0) -> Path:
    """A run folder with one checkpoint in our format (as the trainer writes it) of a tiny model
    (``depth``: encoder blocks, 0 for vit_tiny's)."""
    cfg = config_mod.from_dict(
        {
            "model": {"name": "vit_tiny", "depth": depth, "patch_size": 7, "pred_depth": 1, "pred_emb_dim": 48},
            "data": {"dataset": "idx", "crop_size": 28},
        }
    )
    torch.manual_seed(0)
    student, target = build_models(cfg.model, cfg.data.crop_size)
    with torch.no_grad():  # a target that differs from the context encoder, as after training
        for p in target.parameters():
            p.add_(0.01 * torch.randn_like(p))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    state = {
        "encoder": student.encoder.state_dict(),
        "predictor": student.predictor.state_dict(),
        "target_encoder": target.state_dict(),
        "opt": opt.state_dict(),
        "epoch": 1,
        "loss": 0.5,
        "batch_size": 8,
        "world_size": 1,
        "lr": 1e-3,
        "schedules": {},
        "mask_sampler": {},
        "rng": {},
        "config": cfg.to_dict(),
    }
    ckpt_mod.save_checkpoint(run_dir / "checkpoints", state, step=10, keep=2)
    return run_dir


# ----------------------------------------------------------------------------- features


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return build_encoder("vit_tiny", 32, 16)  # 4 tokens, 12 blocks


def test_avgpool_is_the_mean_of_the_final_tokens(encoder):
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encode(encoder, x, "avgpool"), encoder(x).mean(1))


def test_last4_matches_hooked_blocks(encoder):
    x = torch.randn(3, 3, 32, 32)
    captured = []
    hooks = [blk.register_forward_hook(lambda m, i, o: captured.append(o)) for blk in encoder.blocks[-4:]]
    with torch.no_grad():
        final = encoder(x)
        for h in hooks:
            h.remove()
        expected = torch.cat([encoder.norm(o).mean(1) for o in captured], dim=1)  # (3, 4*192)
        got = encode(encoder, x, "last4")
    assert got.shape == (3, 4 * 192)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got[:, -192:], final.mean(1))  # the last part is avgpool


@pytest.mark.parametrize("kind", ["pair", "dataset", "iterable"])
def test_extract_features_from_any_source_in_order(encoder, kind):
    images, labels = torch.randn(11, 3, 32, 32), torch.arange(11)
    source = {
        "pair": (images, labels),
        "dataset": torch.utils.data.TensorDataset(images, labels),
        "iterable": ((images[i], int(labels[i])) for i in range(11)),
    }[kind]
    encoder.train()
    feats, y = extract_features(encoder, source, batch_size=4, dtype="fp32", progress=False)
    assert encoder.training  # the mode is restored
    assert feats.shape == (11, 192) and feats.dtype == torch.float32 and not feats.requires_grad
    assert torch.equal(y, labels)
    encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(feats, encoder(images).mean(1))


def test_bf16_features_are_close_to_fp32(encoder):
    x = torch.randn(6, 3, 32, 32)
    ref, _ = extract_features(encoder, (x, torch.zeros(6)), dtype="fp32", progress=False)
    low, _ = extract_features(encoder, (x, torch.zeros(6)), dtype="bf16", progress=False)
    assert low.dtype == torch.float32
    assert ((low - ref).norm(dim=1) / ref.norm(dim=1)).max() < 2e-2


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_is_the_trainers_decision(encoder, monkeypatch, native):
    """dtype=auto extracts in bf16 exactly where the run's device.resolve_precision picks bf16."""
    from ijepa_fast.runtime import device as precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    x = torch.randn(4, 3, 32, 32)
    auto, _ = extract_features(encoder, (x, torch.zeros(4)), dtype="auto", progress=False)
    same, _ = extract_features(encoder, (x, torch.zeros(4)), dtype="bf16" if native else "fp32", progress=False)
    other, _ = extract_features(encoder, (x, torch.zeros(4)), dtype="fp32" if native else "bf16", progress=False)
    assert torch.equal(auto, same) and not torch.equal(auto, other)


def test_tokens_are_the_encoders_output_and_average_to_avgpool(encoder):
    images, labels = torch.randn(5, 3, 32, 32), torch.arange(5)
    tokens, y = extract_tokens(encoder, (images, labels), batch_size=2, dtype="fp32", progress=False)
    feats, _ = extract_features(encoder, (images, labels), batch_size=2, dtype="fp32", progress=False)
    assert tokens.shape == (5, 4, 192) and torch.equal(y, labels)
    with torch.no_grad():
        torch.testing.assert_close(tokens, encoder.eval()(images))
    torch.testing.assert_close(tokens.mean(1), feats)


def test_bad_feature_mode_is_named(encoder):
    with pytest.raises(ValueError, match="avgpool"):
        extract_features(encoder, (torch.zeros(1, 3, 32, 32), torch.zeros(1)), mode="cls", progress=False)


# ----------------------------------------------------------------------------- probe


def blobs(n_per_class: int, classes: int, dim: int, spread: float, seed: int, centre_seed: int | None = None):
    """Gaussian blobs around ``classes`` centres (drawn from ``centre_seed``, default ``seed``), shuffled."""
    centres = 3.0 * torch.randn(
        classes, dim, generator=torch.Generator().manual_seed(seed if centre_seed is None else centre_seed)
    )
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=g)
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


@pytest.mark.parametrize("preprocess", ["whiten", "standardize"])
def test_probe_separates_gaussian_blobs(preprocess):
    train_x, train_y = blobs(200, 5, 32, 1.0, seed=0)
    test_x, test_y = blobs(100, 5, 32, 1.0, seed=1, centre_seed=0)  # same centres, new draws
    result = linear_probe(train_x, train_y, test_x, test_y, preprocess=preprocess)
    assert result.top1 > 0.95 and result.train_top1 > 0.95 and result.preprocess == preprocess
    assert result.num_classes == 5 and len(result.sweep) == 8
    assert (result.best_lr, result.best_wd) in {(s["lr"], s["wd"]) for s in result.sweep}


def test_whitening_decorrelates_with_train_statistics():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(6, 6, generator=g)
    mix[5] = mix[4]  # a rank-deficient direction
    x = torch.randn(2000, 6, generator=g) @ mix + 3.0
    (w,) = whiten(x)
    cov = torch.cov(w.T)
    assert w.mean(0).abs().max() < 1e-4
    # eigenvalues ascend: the null direction first (floored, not blown up), then the identity
    assert cov[0, 0] < 1e-3
    torch.testing.assert_close(cov[1:, 1:], torch.eye(5), atol=2e-3, rtol=0)


def test_probe_recovers_a_signal_hidden_in_correlated_features():
    """A label carried by a low-variance direction of strongly correlated features: whitening finds it."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (3000,), generator=g)
    base = 10.0 * torch.randn(3000, 1, generator=g)
    x = torch.cat(
        [
            base + 0.01 * (2.0 * y[:, None] - 1) + 0.002 * torch.randn(3000, 1, generator=g),
            base,
            torch.randn(3000, 6, generator=g),
        ],
        dim=1,
    )
    result = linear_probe(x[:2000], y[:2000], x[2000:], y[2000:])
    assert result.top1 > 0.95


def test_probe_is_near_chance_on_random_labels():
    x = torch.randn(600, 16)
    y = torch.randint(0, 4, (600,))
    result = linear_probe(x[:400], y[:400], x[400:], y[400:])
    assert result.top1 < 0.45


def test_batched_sweep_equals_separate_fits():
    x, y = blobs(50, 3, 8, 2.0, seed=2)
    lrs, wds = torch.tensor([0.01, 0.1]), torch.tensor([0.0, 1e-2])
    W, b = fit_softmax_regression(x, y, 3, lrs, wds, steps=40, batch_size=64)
    for p in range(2):
        Wp, bp = fit_softmax_regression(x, y, 3, lrs[p : p + 1], wds[p : p + 1], steps=40, batch_size=64)
        torch.testing.assert_close(W[p], Wp[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(b[p], bp[0], atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- kNN


def knn_brute_force(train_x, train_y, test_x, k, T, classes):
    """Reference: the whole similarity matrix, a full sort per row, votes summed one by one."""
    a = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    q = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    sims = q @ a.T
    preds = []
    for row in sims:
        order = np.argsort(-row, kind="stable")[:k]
        votes = np.zeros(classes)
        for j in order:
            votes[train_y[j]] += np.exp(row[j] / T)
        preds.append(int(np.argmax(votes)))
    return np.array(preds), np.argsort(-sims, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("chunks", [(1024, None), (16, 70), (100, 13)])
def test_knn_equals_brute_force(chunks):
    rng = np.random.default_rng(0)
    train_x, test_x = rng.normal(size=(500, 16)), rng.normal(size=(97, 16))
    train_y = rng.integers(0, 6, 500)
    ref_pred, ref_idx = knn_brute_force(train_x, train_y, test_x, 20, 0.07, 6)
    t = torch.from_numpy
    _, idx = knn_topk(t(train_x), t(test_x), 20, *chunks)
    assert np.array_equal(idx.numpy(), ref_idx)
    pred = knn_predict(
        t(train_x),
        t(train_y),
        t(test_x),
        k=20,
        temperature=0.07,
        num_classes=6,
        test_chunk=chunks[0],
        train_chunk=chunks[1],
    )
    assert np.array_equal(pred.numpy(), ref_pred)


def test_knn_accuracy_on_blobs_and_small_train_sets():
    train_x, train_y = blobs(50, 4, 8, 0.5, seed=3)
    assert knn_accuracy(train_x, train_y, train_x, train_y).top1 == 1.0
    few = knn_predict(train_x[:5], train_y[:5], train_x, k=20)  # k larger than the train set
    assert few.shape == (len(train_x),)


# ----------------------------------------------------------------------------- ijepa-eval


@pytest.fixture(scope="module")
def idx_data(tmp_path_factory):
    return write_idx_data(tmp_path_factory.mktemp("idx"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return write_our_run(tmp_path_factory.mktemp("run"))


def test_ijepa_eval_on_our_checkpoint_and_idx(tmp_path, capsys, idx_data, run_dir):
    data = idx_data
    out = tmp_path / "report.json"
    rc = cli.main([str(run_dir), "--data", str(data), "--out", str(out), "--no-progress", "--batch-size", "64"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "linear probe top-1:" in printed and "kNN top-1:" in printed
    report = json.loads(out.read_text())
    assert report["format"] == "ijepa_fast" and report["which"] == "target_encoder"
    assert report["data"]["n_train"] == 160 and report["data"]["n_test"] == 48
    assert report["model"]["name"] == "vit_tiny" and report["model"]["img_size"] == "28"
    assert report["feature_dim"] == 192
    for part in ("probe", "knn"):
        assert 0.0 <= report[part]["top1"] <= 1.0
    assert report["knn"]["k"] == 20 and report["knn"]["temperature"] == 0.07
    # the four quadrant classes are easy even for these weights
    assert report["knn"]["top1"] > 0.5


def test_python_m_eval_last4_without_probe(tmp_path, idx_data, run_dir):
    out = tmp_path / "r.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ijepa_fast.eval",
            str(run_dir / "checkpoints" / "latest.pt"),
            "--data",
            str(idx_data),
            "--features",
            "last4",
            "--no-probe",
            "--which",
            "encoder",
            "--limit",
            "30",
            "--out",
            str(out),
            "--no-progress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert "probe" not in report and report["feature_dim"] == 4 * 192 and report["which"] == "encoder"
    assert report["data"]["n_train"] == 30 and report["data"]["n_test"] == 30


def test_ijepa_eval_reports_the_undecodable_images_it_replaced(tmp_path, capsys, run_dir):
    from ijepa_fast.data.synthetic import write_jpeg_folder

    write_jpeg_folder(tmp_path / "data" / "train", 12, size=(40, 32))
    write_jpeg_folder(tmp_path / "data" / "val", 8, size=(40, 32), seed=50)
    (tmp_path / "data" / "val" / "class000" / "empty.jpg").write_bytes(b"")
    (tmp_path / "data" / "val" / "class001" / "notes.jpg").write_text("not an image")
    out = tmp_path / "r.json"
    argv = [str(run_dir), "--data", str(tmp_path / "data"), "--dataset", "folder", "--no-probe", "--no-progress"]
    assert cli.main([*argv, "--num-workers", "2", "--out", str(out)]) == 0  # counted across workers
    data = json.loads(out.read_text())["data"]
    assert (data["n_train"], data["replaced_train"], data["n_test"], data["replaced_test"]) == (12, 0, 10, 2)
    assert "undecodable images replaced: 0 train / 2 test" in capsys.readouterr().out


def test_ijepa_eval_names_missing_data(tmp_path, capsys, run_dir):
    rc = cli.main([str(run_dir), "--data", str(tmp_path / "nowhere"), "--no-progress"])
    assert rc == 1 and "nowhere" in capsys.readouterr().err


# ----------------------------------------------------------------------------- low-shot subsets


def test_low_shot_protocols_parse():
    assert LowShot.parse("1%") == LowShot(fraction=0.01) and LowShot.parse(" 5 ") == LowShot(per_class=5)
    assert LowShot.parse("1%").name == "1% of the labels" and LowShot.parse("5").name == "5 per class"
    for bad in ("x", "0", "150%", "-3"):
        with pytest.raises(ValueError):
            LowShot.parse(bad)


def test_low_shot_subset_is_class_balanced_seeded_and_recorded():
    sizes = {0: 100, 1: 200, 2: 300, 3: 50}
    labels = torch.cat([torch.full((n,), c) for c, n in sizes.items()])
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]

    tenth = label_subset(labels, LowShot(fraction=0.1), seed=3)
    assert torch.bincount(labels[tenth.indices]).tolist() == [10, 20, 30, 5]  # each class keeps its share
    assert tenth.per_class == {0: 10, 1: 20, 2: 30, 3: 5}
    assert torch.equal(tenth.indices, tenth.indices.unique())  # distinct rows, ascending
    assert torch.equal(label_subset(labels, LowShot(fraction=0.1), seed=3).indices, tenth.indices)
    assert not torch.equal(label_subset(labels, LowShot(fraction=0.1), seed=4).indices, tenth.indices)
    # 1% of a 50-image class rounds to 0.5: every class keeps at least one image
    assert label_subset(labels, LowShot(fraction=0.01)).per_class == {0: 1, 1: 2, 2: 3, 3: 1}

    seven = label_subset(labels, LowShot(per_class=7), seed=3)
    assert torch.bincount(labels[seven.indices]).tolist() == [7, 7, 7, 7]
    five = label_subset(labels, LowShot(per_class=5), seed=3)
    assert set(five.indices.tolist()) <= set(seven.indices.tolist())  # the same seeded order, a shorter prefix

    record = json.loads(json.dumps(seven.to_dict()))
    assert record["seed"] == 3 and record["images_per_class"] == 7 and record["n"] == 28
    assert record["indices"] == seven.indices.tolist() and record["per_class_counts"] == {str(c): 7 for c in sizes}
    with pytest.raises(ValueError, match="class 3 has 50 train images, fewer than the 60"):
        label_subset(labels, LowShot(per_class=60))


# ----------------------------------------------------------------------------- attentive probe


def attentive_reference(probe, tokens):
    """The probe's forward written out: LayerNorm, key/value projections, per-head softmax over tokens, linear."""
    D, H = tokens.shape[-1], probe.num_heads
    x = (tokens - tokens.mean(-1, keepdim=True)) / torch.sqrt(tokens.var(-1, unbiased=False, keepdim=True) + 1e-5)
    x = x * probe.norm.weight + probe.norm.bias
    w_k, w_v = probe.kv.weight[:D], probe.kv.weight[D:]
    b_k, b_v = probe.kv.bias[:D], probe.kv.bias[D:]
    pooled = []
    for h in range(H):
        part = slice(h * D // H, (h + 1) * D // H)
        keys = x @ w_k[part].T + b_k[part]  # (B, N, D/H)
        values = x @ w_v[part].T + b_v[part]
        scores = keys @ probe.query[h] / math.sqrt(D // H)  # (B, N)
        pooled.append((torch.softmax(scores, dim=1)[..., None] * values).sum(1))  # (B, D/H)
    return torch.cat(pooled, dim=1) @ probe.head.weight.T + probe.head.bias


def test_attentive_probe_forward_matches_plain_pytorch():
    torch.manual_seed(0)
    probe = AttentiveProbe(dim=48, num_classes=5, num_heads=4)
    with torch.no_grad():  # away from the initialisation's near-zero query and LayerNorm 1/0
        for p in probe.parameters():
            p.add_(0.3 * torch.randn_like(p))
    tokens = torch.randn(3, 11, 48)
    with torch.no_grad():
        torch.testing.assert_close(probe(tokens), attentive_reference(probe, tokens), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="heads"):
        AttentiveProbe(dim=48, num_classes=5, num_heads=5)


def marked_tokens(n: int, seed: int, T: int = 16, D: int = 32, K: int = 4):
    """Tokens [n, T, D] holding every class's pattern at K random positions; only the image's own class's
    token carries a marker (channel 0). Their average is the same for every class: only attention reads it."""
    g = torch.Generator().manual_seed(seed)
    patterns = 3.0 * torch.randn(K, D, generator=torch.Generator().manual_seed(123))
    patterns[:, 0] = 0.0
    y = torch.randint(0, K, (n,), generator=g)
    x = torch.randn(n, T, D, generator=g)
    where = torch.argsort(torch.rand(n, T, generator=g), dim=1)[:, :K]  # (n, K) distinct positions
    x[torch.arange(n)[:, None], where] += patterns[None]
    x[torch.arange(n), where[torch.arange(n), y], 0] += 6.0
    return x, y


def test_attentive_probe_reads_a_label_that_average_pooling_cannot():
    train_x, train_y = marked_tokens(400, seed=10)
    test_x, test_y = marked_tokens(200, seed=20)
    result = attentive_probe(train_x, train_y, test_x, test_y, num_heads=4)
    assert result.top1 > 0.9 and result.num_classes == 4 and result.steps == attentive.MIN_STEPS
    pooled = linear_probe(train_x.mean(1), train_y, test_x.mean(1), test_y)
    assert pooled.top1 < 0.45  # chance is 0.25: the average holds no label


# ----------------------------------------------------------------------------- ijepa-eval: low-shot, attentive


def test_ijepa_eval_low_shot_and_attentive_reports(tmp_path, capsys, idx_data, run_dir):
    out = tmp_path / "r.json"
    args = [str(run_dir), "--data", str(idx_data), "--out", str(out), "--no-progress", "--no-knn", "--no-full"]
    args += ["--low-shot", "5%", "--low-shot", "3", "--attentive", "--attentive-heads", "4", "--attentive-steps", "40"]
    assert cli.main(args) == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["weights"] == "target" and report["encoder"].startswith("vit_tiny: width 192")
    assert report["pooling"] == "avgpool" and (report["data"]["n_train"], report["data"]["n_test"]) == (160, 48)
    assert "probe" not in report and "knn" not in report  # --no-full
    # the subsets are the ones label_subset draws from the train labels with --seed 0, and recorded as such
    with gzip.open(idx_data / "train-labels-idx1-ubyte.gz") as fh:
        labels = torch.from_numpy(np.frombuffer(fh.read()[8:], np.uint8).copy())
    for section, protocol in zip(report["low_shot"], (LowShot(fraction=0.05), LowShot(per_class=3))):
        expected = label_subset(labels.long(), protocol, seed=0)
        assert section["subset"]["indices"] == expected.indices.tolist() and section["subset"]["seed"] == 0
        assert section["probe"]["num_classes"] == 4 and section["attentive"]["steps"] == 40
    assert [(r["train_labels"], r["n_train"], r["head"]) for r in report["results"]] == [
        ("5% of the labels (seed 0)", 8, "linear probe"),
        ("3 per class (seed 0)", 12, "linear probe"),
        ("5% of the labels (seed 0)", 8, "attentive probe"),
        ("3 per class (seed 0)", 12, "attentive probe"),
    ]
    markdown = out.with_suffix(".md").read_text()
    assert "| weights | target (the EMA encoder) |" in markdown and "160 train images" in markdown
    assert "| 3 per class (seed 0) | 12 | attentive probe | attentive |" in markdown
    with pytest.raises(SystemExit):  # nothing left to evaluate
        cli.parse_args([str(run_dir), "--data", str(idx_data), "--no-full"])


# ----------------------------------------------------------------------------- bad input: one line


def test_a_probe_on_one_training_image_says_it_needs_two(tmp_path, capsys, idx_data, run_dir):
    x, y = blobs(4, classes=2, dim=8, spread=0.5, seed=0)
    with pytest.raises(ValueError, match=r"^the linear probe needs at least 2 training images .*; got 1$"):
        linear_probe(x[:1], y[:1], x, y)
    with pytest.raises(ValueError, match=r"^need matching features and labels: train \(8, 8\) / \(7,\)"):
        linear_probe(x, y[:7], x, y)
    assert cli.main([str(run_dir), "--data", str(idx_data), "--limit", "1", "--no-progress"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("ijepa-eval: the linear probe needs at least 2 training images")
    assert lines[-1].endswith("; got 1") and not any("Traceback" in line for line in lines)


def test_attentive_heads_below_one_are_refused_in_one_line(capsys, idx_data, run_dir):
    with pytest.raises(ValueError, match="needs at least 1 head, not 0"):
        AttentiveProbe(dim=48, num_classes=5, num_heads=0)
    with pytest.raises(SystemExit) as exit_:
        cli.main([str(run_dir), "--data", str(idx_data), "--attentive", "--attentive-heads", "0"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "ijepa-eval: error: argument --attentive-heads: 0: must be at least 1"
    )
    argv = [str(run_dir), "--data", str(idx_data), "--attentive", "--attentive-heads", "5", "--no-progress"]
    assert cli.main(argv) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "ijepa-eval: --attentive-heads 5 does not divide the encoder's width 192"
    )


# ----------------------------------------------------------------------------- the report's path


def eval_error_line(capsys) -> str:
    return one_error_line(capsys, "ijepa-eval")


@pytest.mark.parametrize("name", ["rep.md", "rep.MD"])
def test_an_out_ending_in_md_is_refused_before_evaluating(tmp_path, capsys, name):
    """The Markdown report goes beside --out as .md: an --out ending in .md would lose the JSON."""
    out = tmp_path / name
    rc = cli.main([str(tmp_path / "no-checkpoint.pt"), "--data", str(tmp_path / "nowhere"), "--out", str(out)])
    assert rc == 2
    line = eval_error_line(capsys)
    assert line == (
        f"ijepa-eval: --out {out} is the JSON report's path, and the Markdown report goes beside it as .md: "
        f"give a .json path, e.g. {tmp_path / 'rep.json'}"
    )
    assert list(tmp_path.iterdir()) == []


def test_the_json_and_markdown_reports_are_both_kept(tmp_path, capsys, idx_data, run_dir):
    out = tmp_path / "rep"  # no suffix: the Markdown goes to rep.md, the JSON stays at rep
    assert cli.main([str(run_dir), "--data", str(idx_data), "--limit", "40", "--no-probe", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["data"]["n_train"] == 40
    assert (tmp_path / "rep.md").read_text().startswith("# ijepa-eval: ")
    assert f"report: {out} and {tmp_path / 'rep.md'}" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["a folder", "a file as parent", "a folder at the .md", "read-only"])
def test_an_out_that_cannot_be_written_is_one_line_before_evaluating(tmp_path, capsys, monkeypatch, case):
    """Checked first: the checkpoint and data here do not exist, and the error is the report's path."""
    if case == "a folder":
        out = tmp_path / "r.json"
        out.mkdir()
        expected = (
            f"--out {out} is a folder, not a file: give a file name, e.g. {out / 'name'}, or choose another --out"
        )
    elif case == "a file as parent":
        (tmp_path / "afile").write_text("mine")
        out = tmp_path / "afile" / "r.json"
        expected = f"--out {out}: {tmp_path / 'afile'} is a file, not a folder: move that file away"
    elif case == "a folder at the .md":
        out = tmp_path / "r.json"
        (tmp_path / "r.md").mkdir()
        expected = f"the Markdown report {tmp_path / 'r.md'} is a folder, not a file: move it away or choose another"
    else:
        from ijepa_fast.io import outputs

        def refused(folder):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(outputs, "probe_write", refused)  # as a read-only folder does for a user
        out = tmp_path / "r.json"
        expected = f"--out {out} cannot be written ({tmp_path}: Permission denied): make it writable, or choose another"
    before = sorted(tmp_path.rglob("*"))
    rc = cli.main([str(tmp_path / "no-checkpoint.pt"), "--data", str(tmp_path / "nowhere"), "--out", str(out)])
    assert rc == 1
    assert eval_error_line(capsys).startswith(f"ijepa-eval: {expected}")
    assert sorted(tmp_path.rglob("*")) == before and (case != "a file as parent" or out.parent.read_text() == "mine")


def test_a_report_that_fails_to_write_leaves_the_earlier_reports_as_they_were(tmp_path, capsys, monkeypatch, run_dir):
    """A full disk while writing the Markdown: neither report is replaced, no temporary file is left."""
    data = write_idx_data(tmp_path / "data", n_train=20, n_test=8)
    (tmp_path / "r.json").write_text("earlier json")
    (tmp_path / "r.md").write_text("earlier md")

    def disk_full(report):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "markdown_report", disk_full)
    argv = [str(run_dir), "--data", str(data), "--no-probe", "--no-progress", "--out", str(tmp_path / "r.json")]
    assert cli.main(argv) == 1
    assert eval_error_line(capsys) == (
        f"ijepa-eval: {tmp_path / 'r.md'} could not be written (No space left on device): free space on that disk"
    )
    assert (tmp_path / "r.json").read_text() == "earlier json" and (tmp_path / "r.md").read_text() == "earlier md"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "r.json", "r.md"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--device", "banana"], "--device='banana' is invalid: expected auto, cpu, cuda or cuda:N"),
        (["--limit", "-5"], "--limit=-5 is invalid: expected an integer >= 0 (0: all)"),
        (["--batch-size", "0"], "--batch-size=0 is invalid: expected an integer >= 1"),
        (["--img-size", "0"], "argument --img-size: 0: must be at least 1"),
        (["--patch", "0"], "argument --patch: 0: must be at least 1"),
        (["--k", "0"], "argument --k: 0: must be at least 1"),
        (["--no-probe", "--no-knn"], "--no-probe --no-knn leaves nothing to evaluate: drop --no-probe, or add"),
        (["--no-probe", "--no-full", "--low-shot", "5"], "--no-probe with --no-full (kNN runs on all labels only)"),
    ],
)
def test_a_bad_option_is_one_line_before_anything_is_loaded_or_written(extra, message, tmp_path, capsys, run_dir):
    argv = [str(run_dir), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "r.json"), *extra]
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(f"ijepa-eval: error: {message}")
    assert list(tmp_path.iterdir()) == []


def test_the_attentive_probe_alone_is_something_to_evaluate(run_dir, idx_data):
    args = cli.parse_args([str(run_dir), "--data", str(idx_data), "--no-probe", "--no-knn", "--attentive"])
    assert (args.probe, args.knn, args.attentive) == (False, False, True)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--k", "31", "--limit", "30"], "--k 31 is more than the 30 training images: choose --k 30 or fewer"),
        (["--model", "vit_huge"], "'s config describes model 'vit_tiny', not --model 'vit_huge': leave --model out"),
        (["--patch", "16"], "'s config describes patch 7, not --patch 16: leave --patch out"),
    ],
)
def test_an_option_the_checkpoint_or_data_cannot_take_is_one_line_and_writes_nothing(
    extra, message, tmp_path, capsys, idx_data, run_dir
):
    out = tmp_path / "r.json"
    assert cli.main([str(run_dir), "--data", str(idx_data), "--out", str(out), "--no-progress", *extra]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ijepa-eval: ")]
    assert len(lines) == 1 and message in lines[0]
    assert list(tmp_path.iterdir()) == []
