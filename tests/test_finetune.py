"""ijepa-finetune: layer-wise lr decay against a hand computation, a trivially separable set learnt to
100%, a stopped and resumed fine-tuning equal to an uninterrupted one, drop path, the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ijepa_fast.cli import finetune as finetune_cli
from ijepa_fast.data.idx import write_idx
from ijepa_fast.finetune.recipe import Classifier, layer_decay_groups
from ijepa_fast.io import checkpoint as ckpt
from ijepa_fast.models.vit import build_encoder, drop_path, set_drop_path
from ijepa_fast.train.metrics import read_metrics

LEVELS = (0, 85, 170, 255)  # class c: an image of grey level LEVELS[c] plus noise


def write_separable(root: Path, n_train: int = 64, n_test: int = 32, seed: int = 0) -> Path:
    """IDX train and test splits of 16 x 16 images whose class is their mean grey level (4 classes):
    linearly separable, so a fine-tuned classifier must reach 100%."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % len(LEVELS)
        noise = rng.integers(-20, 21, (n, 16, 16))
        images = np.clip(np.asarray(LEVELS)[labels][:, None, None] + noise, 0, 255).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8))
    return root


def write_pretrained(folder: Path, seed: int = 0) -> Path:
    """A run folder with one checkpoint of a 2-block ViT-tiny/8 at 16 px (random weights)."""
    torch.manual_seed(seed)
    enc = build_encoder("vit_tiny", img_size=16, patch_size=8, depth=2)
    state = {
        "encoder": enc.state_dict(),
        "target_encoder": enc.state_dict(),
        "config": {"model": {"name": "vit_tiny", "patch_size": 8, "depth": 2}, "data": {"crop_size": 16}},
    }
    ckpt.save_checkpoint(folder / "checkpoints", state, step=1, keep=1)
    return folder


def options(data: Path, out: Path, **extra) -> list[str]:
    values = {
        "data": data, "out": out, "epochs": 8, "batch-size": 16, "lr": 2e-3, "warmup-epochs": 1,
        "num-workers": 0, "device": "cpu", "dtype": "fp32", "log-every": 2, "checkpoint-every": 4,
        "crop-scale": "0.8 1.0",
    }  # fmt: skip
    values.update(extra)
    return [part for k, v in values.items() for part in (f"--{k}", *str(v).split())]


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bitwise repeatable, and fast on a shared machine
    yield
    torch.set_num_threads(threads)


def test_layer_decay_gives_each_layer_the_hand_computed_lr():
    """Depth 3, decay 0.5, lr 1e-3: patch embedding 1e-3 x 0.5^4, block i 1e-3 x 0.5^(3-i), final norm
    and head 1e-3; no weight decay on biases and norms; the fixed position table is not trained. One
    AdamW step then moves each bias by its group's lr (Adam's first step is lr x g / |g|)."""
    torch.manual_seed(0)
    model = Classifier(build_encoder("vit_tiny", img_size=16, patch_size=8, depth=3), num_classes=4)
    model.encoder.pos_embed.requires_grad_(False)
    groups = layer_decay_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=0.5)
    lr = {name: g["lr"] for g in groups for name in g["names"]}
    wd = {name: g["weight_decay"] for g in groups for name in g["names"]}
    expected = {
        "encoder.patch_embed.proj.weight": 6.25e-5,
        "encoder.blocks.0.attn.qkv.weight": 1.25e-4,
        "encoder.blocks.1.mlp.fc2.bias": 2.5e-4,
        "encoder.blocks.2.norm1.weight": 5e-4,
        "encoder.norm.bias": 1e-3,
        "head.weight": 1e-3,
    }
    assert {k: lr[k] for k in expected} == pytest.approx(expected, rel=1e-12)
    assert "encoder.pos_embed" not in lr
    assert wd["encoder.blocks.0.attn.qkv.weight"] == 0.05 and wd["encoder.blocks.1.mlp.fc2.bias"] == 0.0
    assert wd["encoder.norm.bias"] == 0.0 and len(lr) == sum(p.requires_grad for p in model.parameters())
    opt = torch.optim.AdamW(groups, eps=1e-12)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(8, 3, 16, 16)).logsumexp(1).mean().backward()
    opt.step()
    for name in ("encoder.blocks.1.mlp.fc2.bias", "encoder.norm.bias", "encoder.blocks.2.norm1.bias"):
        moved = (dict(model.named_parameters())[name] - before[name]).abs().max().item()
        assert moved == pytest.approx(lr[name], rel=1e-3), name


def test_drop_path_drops_whole_samples_and_keeps_the_expectation():
    torch.manual_seed(0)
    x = torch.ones(4000, 5, 3)
    out = drop_path(x, 0.25, training=True)
    per_sample = out[:, 0, 0]
    assert set(per_sample.unique().tolist()) == {0.0, torch.tensor(4 / 3).item()} and torch.equal(
        out, per_sample[:, None, None].expand_as(x)
    )
    assert abs(per_sample.mean().item() - 1.0) < 0.05
    assert drop_path(x, 0.25, training=False) is x
    enc = build_encoder("vit_tiny", img_size=16, patch_size=8, depth=5)
    assert set_drop_path(enc.blocks, 0.2) == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


def test_a_trivially_separable_set_is_learnt_to_100_percent_and_reported(tmp_path, one_thread, capsys):
    data, run = write_separable(tmp_path / "data"), write_pretrained(tmp_path / "run")
    out = tmp_path / "ft"
    assert finetune_cli.main([str(run), *options(data, out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["results"][0]["top1"] == 1.0 and report["steps"] == 32
    assert report["weights"] == "target" and report["data"]["num_classes"] == 4
    assert "| fine-tuned | avgpool | 100.00% |" in (out / "report.md").read_text()
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 32 // 2  # a row per log
    state = ckpt.load_file(out / "checkpoints" / "latest.pt")
    assert state["step"] == 32 and set(state["head"]) == {"weight", "bias"}


def test_a_stopped_and_resumed_fine_tuning_repeats_the_uninterrupted_one_bitwise(tmp_path, one_thread):
    data, run = write_separable(tmp_path / "data"), write_pretrained(tmp_path / "run")
    common = {"epochs": 3, "drop-path": 0.3}  # drop path: the restored RNG must give the same draws
    assert finetune_cli.main([str(run), *options(data, tmp_path / "a", **common)]) == 0
    assert finetune_cli.main([str(run), *options(data, tmp_path / "b", **common, **{"max-steps": 4})]) == 0
    assert finetune_cli.main([str(run), *options(data, tmp_path / "b", **common), "--resume"]) == 0
    a, b = (ckpt.load_file(tmp_path / x / "checkpoints" / "latest.pt") for x in "ab")
    assert a["step"] == b["step"] == 12
    for key in ("encoder", "head"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    rows = [read_metrics(tmp_path / x / "metrics.csv") for x in "ab"]
    assert [(r["step"], r["loss"]) for r in rows[0]] == [(r["step"], r["loss"]) for r in rows[1]]


def test_a_changed_recipe_and_a_start_over_a_fine_tuning_are_refused(tmp_path, one_thread, capsys):
    data, run = write_separable(tmp_path / "data"), write_pretrained(tmp_path / "run")
    out = tmp_path / "ft"
    assert finetune_cli.main([str(run), *options(data, out, **{"epochs": 1})]) == 0
    capsys.readouterr()
    assert finetune_cli.main([str(run), *options(data, out, **{"epochs": 1})]) == 1
    assert "already holds a fine-tuning: pass --resume" in capsys.readouterr().err
    assert finetune_cli.main([str(run), *options(data, out, **{"epochs": 1, "lr": 1e-3}), "--resume"]) == 1
    assert "lr: 0.002 -> 0.001" in capsys.readouterr().err
    assert finetune_cli.main([str(run), *options(data, out, **{"layer-decay": 1.5})]) == 2
    assert "--layer-decay=1.5 is invalid" in capsys.readouterr().err


def folder_state(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes."""
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_a_resume_from_another_pretrained_checkpoint_is_refused_and_changes_nothing(tmp_path, one_thread, capsys):
    """The fine-tuned weights descend from the first checkpoint: a resume naming another one is refused as
    a changed --lr is, instead of recording the other one as the source."""
    data, run = write_separable(tmp_path / "data"), write_pretrained(tmp_path / "run")
    other = write_pretrained(tmp_path / "other", seed=1)
    out = tmp_path / "ft"
    assert finetune_cli.main([str(run), *options(data, out, **{"epochs": 1})]) == 0
    before = folder_state(out)
    capsys.readouterr()
    assert finetune_cli.main([str(other), *options(data, out, **{"epochs": 1}), "--resume"]) == 1
    err = capsys.readouterr().err
    source = run / "checkpoints" / ckpt.checkpoint_name(1)
    assert err.strip().splitlines()[-1] == (
        f"ijepa-finetune: {out} was fine-tuned with other settings (source: '{source}' -> "
        f"'{other / 'checkpoints' / ckpt.checkpoint_name(1)}'): keep them, or choose another --out"
    )
    assert folder_state(out) == before
    assert json.loads((out / "finetune.json").read_text())["source"] == str(source)
    assert finetune_cli.main([str(source), *options(data, out, **{"epochs": 1}), "--resume"]) == 0  # the same file


@pytest.mark.parametrize("resume", [False, True])
def test_a_pretraining_run_folder_as_out_is_refused_naming_it_and_changes_nothing(tmp_path, resume, capsys):
    data, run = write_separable(tmp_path / "data"), write_pretrained(tmp_path / "run")
    (run / "config.yaml").write_text("model: {name: vit_tiny}\n")
    (run / "train.log").write_text("")
    before = folder_state(run)
    assert finetune_cli.main([str(run), *options(data, run), *(["--resume"] if resume else [])]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"ijepa-finetune: --out {run} is a pretraining run folder, not a fine-tuning one: choose another --out "
        f"(without --out, a run folder's fine-tuning goes to {run / 'finetune'})"
    )
    assert folder_state(run) == before and sorted(p.name for p in run.iterdir()) == [
        "checkpoints",
        "config.yaml",
        "train.log",
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("checkpoints", "holds checkpoints but no finetune.json: they are not a fine-tuning's; choose another --out"),
        ("other files", "holds other files than a fine-tuning's (notes.txt, pictures): choose another --out"),
    ],
)
def test_an_out_folder_holding_anything_but_a_fine_tuning_is_refused(tmp_path, content, message, capsys):
    data, run = write_separable(tmp_path / "data"), write_pretrained(tmp_path / "run")
    out = write_pretrained(tmp_path / "out") if content == "checkpoints" else tmp_path / "out"
    if content == "other files":
        (out / "pictures").mkdir(parents=True)
        (out / "notes.txt").write_text("mine")
    before = folder_state(out)
    for resume in ([], ["--resume"]):
        assert finetune_cli.main([str(run), *options(data, out), *resume]) == 1
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"ijepa-finetune: --out {out} {message}"
        assert folder_state(out) == before


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("device", "banana", "--device='banana' is invalid: expected auto, cpu, cuda or cuda:N"),
        ("limit", "-5", "--limit=-5 is invalid: expected an integer >= 0 (0: all)"),
    ],
)
def test_a_bad_data_option_is_the_one_line_ijepa_eval_gives_and_creates_nothing(
    tmp_path, option, value, message, capsys
):
    data, run = write_separable(tmp_path / "data"), write_pretrained(tmp_path / "run")
    assert finetune_cli.main([str(run), *options(data, tmp_path / "ft", **{option: value})]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"ijepa-finetune: {message}"
    assert not (tmp_path / "ft").exists()
