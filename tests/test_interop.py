"""Checkpoints in and out: the authors' .pth.tar (strict, errors that list keys), ours, untrusted files,
safetensors round trips, the timm mapping, and the ijepa-export / ijepa-extract command lines."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ijepa_fast.cli import eval as eval_cli
from ijepa_fast.cli import export as export_cli
from ijepa_fast.eval.features import extract_features
from ijepa_fast.io import checkpoint as ckpt_mod
from ijepa_fast.io.authors import load_authors_checkpoint
from ijepa_fast.io.checkpoint import UntrustedCheckpointError
from ijepa_fast.io.encoder import CheckpointMismatchError, EncoderSpec, strip_module_prefix
from ijepa_fast.io.hf import export_hf
from ijepa_fast.io.load import load_encoder
from ijepa_fast.io.safetensors_timm import (
    SAFETENSORS_FORMAT,
    build_timm_model,
    export_safetensors,
    load_safetensors_encoder,
    read_safetensors,
    timm_key,
    timm_kwargs,
    to_timm_state_dict,
)
from ijepa_fast.models.pos_embed import sincos_pos_embed_2d
from tests.payloads import plant
from tests.test_eval import write_idx_data, write_our_run

# The synthetic authors' model: ViT-tiny/16 at 64 px (4x4 grid), predictor 2 blocks of width 96.
D, DEPTH, P, IMG, DP, PRED_DEPTH = 192, 12, 16, 64, 96, 2
N = (IMG // P) ** 2


def block_shapes(prefix: str, dim: int) -> dict[str, tuple]:
    h = 4 * dim
    return {
        f"{prefix}.norm1.weight": (dim,),
        f"{prefix}.norm1.bias": (dim,),
        f"{prefix}.attn.qkv.weight": (3 * dim, dim),
        f"{prefix}.attn.qkv.bias": (3 * dim,),
        f"{prefix}.attn.proj.weight": (dim, dim),
        f"{prefix}.attn.proj.bias": (dim,),
        f"{prefix}.norm2.weight": (dim,),
        f"{prefix}.norm2.bias": (dim,),
        f"{prefix}.mlp.fc1.weight": (h, dim),
        f"{prefix}.mlp.fc1.bias": (h,),
        f"{prefix}.mlp.fc2.weight": (dim, h),
        f"{prefix}.mlp.fc2.bias": (dim,),
    }


def authors_encoder_shapes() -> dict[str, tuple]:
    shapes = {"pos_embed": (1, N, D), "patch_embed.proj.weight": (D, 3, P, P), "patch_embed.proj.bias": (D,)}
    for i in range(DEPTH):
        shapes |= block_shapes(f"blocks.{i}", D)
    return shapes | {"norm.weight": (D,), "norm.bias": (D,)}


def authors_predictor_shapes() -> dict[str, tuple]:
    shapes = {
        "mask_token": (1, 1, DP),
        "predictor_pos_embed": (1, N, DP),
        "predictor_embed.weight": (DP, D),
        "predictor_embed.bias": (DP,),
    }
    for i in range(PRED_DEPTH):
        shapes |= block_shapes(f"predictor_blocks.{i}", DP)
    return shapes | {
        "predictor_norm.weight": (DP,),
        "predictor_norm.bias": (DP,),
        "predictor_proj.weight": (D, DP),
        "predictor_proj.bias": (D,),
    }


def random_state(shapes: dict[str, tuple], g: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for k, shape in shapes.items():
        if k.endswith("pos_embed"):  # the fixed sin-cos table, as the authors store it
            out[k] = torch.from_numpy(sincos_pos_embed_2d(shape[-1], IMG // P)).float()[None]
        elif ".norm" in k or k.startswith("norm") or "_norm" in k:
            out[k] = (1.0 if k.endswith("weight") else 0.0) + 0.1 * torch.randn(shape, generator=g)
        else:
            out[k] = 0.05 * torch.randn(shape, generator=g)
    return out


def authors_checkpoint(seed: int = 0) -> dict:
    """A dict in the authors' exact layout: DDP 'module.' prefixes, optimizer and scaler states, bookkeeping."""
    g = torch.Generator().manual_seed(seed)
    enc = random_state(authors_encoder_shapes(), g)
    target = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in enc.items()}
    pred = random_state(authors_predictor_shapes(), g)
    prefixed = lambda sd: {f"module.{k}": v for k, v in sd.items()}  # noqa: E731
    params = list(enc.values()) + list(pred.values())
    opt = {
        "state": {
            i: {"step": torch.tensor(1000.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
            for i, p in enumerate(params[:3])
        },
        "param_groups": [
            {
                "lr": 1e-3,
                "betas": (0.9, 0.999),
                "eps": 1e-8,
                "weight_decay": 0.04,
                "amsgrad": False,
                "params": list(range(len(params))),
            }
        ],
    }
    scaler = {
        "scale": 65536.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 2000,
        "_growth_tracker": 0,
    }
    return {
        "encoder": prefixed(enc),
        "predictor": prefixed(pred),
        "target_encoder": prefixed(target),
        "opt": opt,
        "scaler": scaler,
        "epoch": 300,
        "loss": 0.1234,
        "batch_size": 128,
        "world_size": 16,
        "lr": 1e-3,
    }


@pytest.fixture(scope="module")
def authors_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("authors") / "IN1K-vit.t.16-64px-ep300.pth.tar"
    torch.save(authors_checkpoint(), path)
    return path


def save_variant(tmp_path: Path, edit) -> Path:
    ckpt = authors_checkpoint()
    edit(ckpt)
    path = tmp_path / "edited.pth.tar"
    torch.save(ckpt, path)
    return path


def images(n: int = 4, size: int = IMG, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the authors' checkpoints


def test_authors_checkpoint_loads_strictly(authors_file):
    raw = torch.load(authors_file, weights_only=True)
    loaded = load_authors_checkpoint(authors_file)
    assert (loaded.spec.name, loaded.spec.patch_size, loaded.spec.img_size, loaded.spec.num_heads) == (
        "vit_tiny",
        16,
        64,
        3,
    )
    assert loaded.meta == {"epoch": 300, "loss": 0.1234, "batch_size": 128, "world_size": 16, "lr": 1e-3}
    for module, key in (
        (loaded.encoder, "encoder"),
        (loaded.target_encoder, "target_encoder"),
        (loaded.predictor, "predictor"),
    ):
        ours = module.state_dict()
        theirs = strip_module_prefix(raw[key])
        assert set(ours) == set(theirs)
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), key
    assert not loaded.target_encoder.pos_embed.requires_grad and loaded.encoder.blocks[0].attn.qkv.weight.requires_grad
    assert loaded.predictor.predictor_blocks[0].attn.num_heads == 3 and len(loaded.predictor.predictor_blocks) == 2
    assert loaded.opt["param_groups"][0]["lr"] == 1e-3


def test_loaded_authors_model_runs_a_training_forward(authors_file):
    loaded = load_authors_checkpoint(authors_file)
    ctx_idx = torch.tensor([[0, 1, 4, 5, 10], [2, 3, 6, 7, 15]])  # (B, Kc)
    tgt_idx = torch.tensor([[[8, 9], [12, 13]]])  # (M=1, B, Kt)
    z = loaded.encoder(images(2), ctx_idx)  # (2, 5, D)
    pred = loaded.predictor(z, ctx_idx, tgt_idx)
    assert pred.shape == (2, 2, D) and torch.isfinite(pred).all()


def test_load_encoder_dispatches_on_the_authors_format(authors_file):
    raw = strip_module_prefix(torch.load(authors_file, weights_only=True)["target_encoder"])
    loaded = load_encoder(authors_file)
    assert (loaded.format, loaded.which) == ("authors", "target_encoder")
    assert all(torch.equal(v, raw[k]) for k, v in loaded.encoder.state_dict().items())
    same = load_encoder(authors_file, "encoder", model="vit_tiny", patch_size=16, img_size=64)
    assert same.which == "encoder" and same.spec == loaded.spec


def test_user_stated_size_that_disagrees_lists_every_mismatch(authors_file):
    with pytest.raises(CheckpointMismatchError) as err:
        load_encoder(authors_file, model="vit_small")  # 384 wide, 6 heads
    msg = str(err.value)
    for key in (
        "patch_embed.proj.weight: (192, 3, 16, 16) vs (384, 3, 16, 16)",
        "pos_embed: (1, 16, 192) vs (1, 16, 384)",
        "blocks.11.mlp.fc2.weight: (192, 768) vs (384, 1536)",
        "norm.bias: (192,) vs (384,)",
    ):
        assert key in msg
    assert "vit_small" in msg
    with pytest.raises(CheckpointMismatchError, match="patch size is 16, not 14"):
        load_encoder(authors_file, patch_size=14)
    with pytest.raises(CheckpointMismatchError, match="trained at 64 px"):
        load_encoder(authors_file, img_size=224)


def test_missing_unexpected_and_misshapen_keys_are_all_listed(tmp_path):
    def edit(ckpt):
        enc = ckpt["target_encoder"]
        del enc["module.blocks.5.norm2.bias"]
        enc["module.blocks.3.mlp.fc1.weight"] = torch.zeros(700, D)
        enc["module.head.weight"] = torch.zeros(10, D)

    path = save_variant(tmp_path, edit)
    with pytest.raises(CheckpointMismatchError) as err:
        load_encoder(path)
    msg = str(err.value)
    assert "blocks.5.norm2.bias" in msg and "head.weight" in msg
    assert "blocks.3.mlp.fc1.weight: (700, 192) vs (768, 192)" in msg
    assert err.value.missing == ["blocks.5.norm2.bias"] and err.value.unexpected == ["head.weight"]


def test_truncated_depth_is_missing_blocks_for_a_named_size(tmp_path):
    def edit(ckpt):
        for k in [k for k in ckpt["encoder"] if k.startswith("module.blocks.11.")]:
            del ckpt["encoder"][k]

    path = save_variant(tmp_path, edit)
    with pytest.raises(CheckpointMismatchError) as err:
        load_encoder(path, "encoder", model="vit_tiny")
    assert len(err.value.missing) == 12 and all(k.startswith("blocks.11.") for k in err.value.missing)
    # without a stated size the shapes decide: an 11-block encoder, loaded as such
    assert len(load_encoder(path, "encoder").encoder.blocks) == 11


def test_predictor_mismatch_is_listed(tmp_path):
    path = save_variant(tmp_path, lambda c: c["predictor"].pop("module.predictor_proj.bias"))
    with pytest.raises(CheckpointMismatchError, match=r"predictor\][\s\S]*predictor_proj.bias"):
        load_authors_checkpoint(path)


def test_unknown_width_asks_for_the_model(tmp_path):
    enc = {
        k: torch.zeros(tuple(200 if s == D else 3 * 200 if s == 3 * D else 800 if s == 4 * D else s for s in v))
        for k, v in authors_encoder_shapes().items()
    }
    path = tmp_path / "odd.pt"
    torch.save(enc, path)
    with pytest.raises(ValueError, match="--model"):
        load_encoder(path)


def test_which_must_exist(tmp_path):
    path = save_variant(tmp_path, lambda c: c.pop("target_encoder"))
    with pytest.raises(KeyError, match="has: encoder"):
        load_encoder(path)


def test_strip_module_prefix():
    sd = {"module.a.weight": 1, "module._orig_mod.b": 2, "c": 3}
    assert strip_module_prefix(sd) == {"a.weight": 1, "b": 2, "c": 3}


# ----------------------------------------------------------------------------- untrusted files


def test_untrusted_objects_are_refused_unless_trusted(tmp_path):
    ckpt = authors_checkpoint()
    ckpt["args"] = argparse.Namespace(lr=1e-3)  # an object the safe unpickler refuses
    path = tmp_path / "with-args.pth.tar"
    torch.save(ckpt, path)
    with pytest.raises(UntrustedCheckpointError, match=r"argparse\.Namespace[\s\S]*trust"):
        load_encoder(path)
    assert load_encoder(path, trust=True).format == "authors"


def test_missing_file_and_unknown_content(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_encoder(tmp_path / "nope.pt")
    torch.save({"weights": [1, 2, 3]}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="unrecognised checkpoint"):
        load_encoder(tmp_path / "odd.pt")


CLIS = ("ijepa-eval", "ijepa-export")


def run_cli(tool: str, checkpoint: Path, tmp_path: Path) -> int:
    if tool == "ijepa-eval":
        return eval_cli.main([str(checkpoint), "--data", str(tmp_path), "--no-progress"])
    return export_cli.export_main([str(checkpoint), "--out", str(tmp_path / "out.safetensors")])


def one_error_line(tool: str, capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{tool}: "), lines
    return lines[0]


@pytest.mark.parametrize("tool", CLIS)
def test_a_planted_payload_is_refused_by_the_command_lines_and_runs_nothing(tool, authors_file, tmp_path, capsys):
    path = tmp_path / "planted.pth.tar"
    shutil.copy(authors_file, path)
    plant(path, tmp_path / "ran")
    assert run_cli(tool, path, tmp_path) == 1
    line = one_error_line(tool, capsys)
    assert str(path) in line and "posix.system" in line and "--trust-checkpoint" in line
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("tool", CLIS)
@pytest.mark.parametrize(
    "content", [b"", b"encoder: vit_huge\n", bytes(range(3, 256)) * 4], ids=["empty", "text", "bytes"]
)
def test_a_file_that_is_not_a_checkpoint_is_one_line_naming_it(tool, content, tmp_path, capsys):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    assert run_cli(tool, path, tmp_path) == 1
    line = one_error_line(tool, capsys)
    assert str(path) in line and "not a checkpoint" in line and "trust" not in line


@pytest.mark.parametrize("tool", CLIS)
@pytest.mark.parametrize("damage", ["truncated", "bytes"])
def test_a_bad_safetensors_file_is_one_line_naming_it(tool, damage, authors_file, tmp_path, capsys):
    pytest.importorskip("safetensors", reason="safetensors is not installed (pip install safetensors)")
    encoder = load_authors_checkpoint(authors_file, predictor=False).target_encoder
    good = export_safetensors(encoder, tmp_path / "good.safetensors")
    path = tmp_path / "bad.safetensors"
    path.write_bytes(good.read_bytes()[:-100] if damage == "truncated" else bytes(range(3, 256)) * 4)
    assert run_cli(tool, path, tmp_path) == 1
    line = one_error_line(tool, capsys)
    assert str(path) in line and "safetensors" in line


# ----------------------------------------------------------------------------- our checkpoints


def test_our_checkpoint_and_run_folder(tmp_path):
    run_dir = write_our_run(tmp_path / "run")
    raw = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    for which in ("target_encoder", "encoder"):
        loaded = load_encoder(run_dir, which)  # a run folder means its latest.pt
        assert loaded.format == "ijepa_fast" and loaded.meta["step"] == 10
        assert (loaded.spec.name, loaded.spec.patch_size, loaded.spec.img_size) == ("vit_tiny", 7, 28)
        assert all(torch.equal(v, raw[which][k]) for k, v in loaded.encoder.state_dict().items())


@pytest.mark.parametrize("given", ["run folder", "latest.pt"])
def test_a_latest_pt_pointing_at_a_deleted_checkpoint_loads_the_newest_that_loads_and_says_so(given, tmp_path, caplog):
    run_dir = write_our_run(tmp_path / "run")  # step 10
    folder = run_dir / "checkpoints"
    kept = torch.load(folder / ckpt_mod.checkpoint_name(10), weights_only=True)
    newer = {**kept, "target_encoder": {k: v + 1 for k, v in kept["target_encoder"].items()}}
    ckpt_mod.save_checkpoint(folder, newer, step=20, keep=3)
    ckpt_mod.save_checkpoint(folder, newer, step=30, keep=3)
    (folder / ckpt_mod.checkpoint_name(30)).unlink()  # latest.pt now points at nothing
    (folder / ckpt_mod.checkpoint_name(20)).write_bytes(b"damaged")  # the next newest does not load
    path = run_dir if given == "run folder" else folder / "latest.pt"
    with caplog.at_level("WARNING"):
        loaded = load_encoder(path)
    assert loaded.meta["step"] == 10 and loaded.path == str(folder / ckpt_mod.checkpoint_name(10))
    state = loaded.encoder.state_dict()
    assert all(torch.equal(v, kept["target_encoder"][k]) for k, v in state.items())
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"{folder / 'latest.pt'} points at {ckpt_mod.checkpoint_name(30)}, which does not exist: " in warning
    assert f"loading the newest checkpoint that loads, {folder / ckpt_mod.checkpoint_name(10)}" in warning


def test_a_run_folder_whose_checkpoints_are_all_gone_is_one_error_naming_it(tmp_path):
    run_dir = write_our_run(tmp_path / "run")
    (run_dir / "checkpoints" / ckpt_mod.checkpoint_name(10)).unlink()
    with pytest.raises(
        FileNotFoundError, match=r"latest\.pt points at ckpt-00000010\.pt, which does not exist, and no "
    ):
        load_encoder(run_dir)


def test_our_checkpoint_of_a_shallower_encoder_than_its_named_size_loads_with_its_depth(tmp_path):
    run_dir = write_our_run(tmp_path / "run", depth=3)  # model.depth=3 of vit_tiny's 12 blocks
    raw = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)["target_encoder"]
    loaded = load_encoder(run_dir)
    assert len(loaded.encoder.blocks) == loaded.spec.depth == 3
    assert (loaded.spec.embed_dim, loaded.spec.num_heads, loaded.spec.name) == (192, 3, "")  # not a standard size
    state = loaded.encoder.state_dict()
    assert set(state) == set(raw) and all(torch.equal(v, raw[k]) for k, v in state.items())


def test_our_checkpoint_whose_config_names_no_size_is_read_from_its_tensors(tmp_path):
    """A fine-tuning of a custom depth records the model name "" (no standard size): that is no size to
    check --model against nor to build, so the tensors and the recorded depth give the encoder."""
    run_dir = write_our_run(tmp_path / "run", depth=3)
    state = torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)
    state["config"]["model"]["name"] = ""
    path = tmp_path / "finetuned.pt"
    torch.save(state, path)
    loaded = load_encoder(path, "encoder")
    assert (loaded.spec.embed_dim, loaded.spec.depth, loaded.spec.patch_size) == (192, 3, 7)
    assert load_encoder(path, "encoder", model="vit_tiny").spec == loaded.spec


# ----------------------------------------------------------------------------- safetensors


def test_safetensors_round_trip(authors_file, tmp_path):
    pytest.importorskip("safetensors", reason="safetensors is not installed (pip install safetensors)")
    encoder = load_encoder(authors_file).encoder
    path = export_safetensors(encoder, tmp_path / "enc.safetensors", {"note": "test"})
    back, spec, meta = load_safetensors_encoder(path)
    assert meta["format"] == SAFETENSORS_FORMAT and meta["note"] == "test"
    assert spec == EncoderSpec.of(encoder)
    a, b = encoder.state_dict(), back.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        assert torch.equal(encoder(images()), back(images()))
    assert load_encoder(path).format == "safetensors"


# ----------------------------------------------------------------------------- timm


def expected_timm_keys(depth: int) -> set[str]:
    """timm's VisionTransformer(class_token=False, global_pool='avg', fc_norm=False, num_classes=0) names."""
    keys = {"pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    for i in range(depth):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys |= {f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"}
    return keys


def test_timm_state_dict_names_and_kwargs(authors_file):
    encoder = load_encoder(authors_file).encoder
    sd = to_timm_state_dict(encoder)
    assert set(sd) == expected_timm_keys(DEPTH)
    assert all(torch.equal(sd[timm_key(k)], v) for k, v in encoder.state_dict().items())
    kw = timm_kwargs(encoder)
    assert kw["class_token"] is False and kw["global_pool"] == "avg" and kw["fc_norm"] is False
    assert (kw["num_classes"], kw["embed_dim"], kw["depth"], kw["num_heads"], kw["img_size"], kw["patch_size"]) == (
        0,
        D,
        DEPTH,
        3,
        IMG,
        P,
    )
    with pytest.raises(KeyError):
        timm_key("head.weight")


def test_timm_model_gives_the_same_features(authors_file):
    pytest.importorskip("timm", reason="timm is not importable here (it needs torchvision); pip install timm")
    encoder = load_encoder(authors_file).encoder.eval()
    model = build_timm_model(encoder).eval()
    x = images(3)
    with torch.no_grad():
        ours, theirs = encoder(x).mean(1), model(x)
    assert theirs.shape == (3, D)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_timm_export_loads_into_timms_gap_models(authors_file, tmp_path):
    """timm's vit_*_gap models as installed (torchvision stubbed out when it cannot import): the
    export loads strictly and gives our features; its names and shapes are vit_huge_patch14_gap_224's."""
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (pip install --no-deps timm)")
    pytest.importorskip("safetensors", reason="safetensors is not installed (pip install safetensors)")
    export, x = tmp_path / "timm.safetensors", images(3)
    assert export_cli.export_main([str(authors_file), "--out", str(export), "--timm"]) == 0
    torch.save(x, tmp_path / "images.pt")
    worker = Path(__file__).with_name("timm_worker.py")
    proc = subprocess.run(
        [sys.executable, str(worker), str(export), str(tmp_path / "images.pt"), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(tmp_path / "out.pt", weights_only=True)
    encoder = load_encoder(authors_file).encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(result["features"], encoder(x).mean(1), atol=1e-5, rtol=0)
    vit_h = EncoderSpec(1280, 32, 16, 14, 224).build(device="meta")
    ours = {k: tuple(v.shape) for k, v in to_timm_state_dict(vit_h).items()}
    assert ours == result["vit_huge_shapes"]


# ----------------------------------------------------------------------------- Hugging Face transformers


def hf_model(folder: Path):
    transformers = pytest.importorskip(
        "transformers", reason="transformers is not installed (pip install transformers)"
    )
    return transformers.IJepaModel.from_pretrained(str(folder)).eval()


def hf_features(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state


def test_ijepa_export_hf_gives_transformers_the_same_outputs(authors_file, tmp_path, capsys):
    out = tmp_path / "hf"
    assert export_cli.export_main([str(authors_file), "--hf", str(out), "--which", "context"]) == 0
    assert "context encoder" in capsys.readouterr().out
    model = hf_model(out)
    context = load_encoder(authors_file, "encoder").encoder.eval()
    x = images(3)
    with torch.no_grad():
        ours = context(x)
    torch.testing.assert_close(hf_features(model, x), ours, atol=1e-5, rtol=0)
    config = json.loads((out / "config.json").read_text())
    assert (config["layer_norm_eps"], config["hidden_act"], config["qkv_bias"]) == (1e-6, "gelu", True)
    assert (config["image_size"], config["patch_size"], config["intermediate_size"]) == (IMG, P, 4 * D)
    assert config["ijepa_fast"]["which"] == "encoder" and config["ijepa_fast"]["weights"] == "context"
    assert model.pooler is None
    _, meta = read_safetensors(out / "model.safetensors")
    assert meta["format"] == "pt" and meta["ijepa_fast.weights"] == "context"
    prep = json.loads((out / "preprocessor_config.json").read_text())
    assert prep["size"] == {"height": IMG, "width": IMG} and prep["image_mean"] == [0.485, 0.456, 0.406]
    assert prep["image_std"] == [0.229, 0.224, 0.225] and prep["rescale_factor"] == pytest.approx(1 / 255)


def test_hf_export_uses_the_names_save_pretrained_writes(authors_file, tmp_path):
    """The published facebook/ijepa_* checkpoints were written by save_pretrained: same names, same shapes."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    encoder = load_encoder(authors_file).encoder
    export_hf(encoder, tmp_path / "ours")
    config = transformers.IJepaConfig.from_pretrained(str(tmp_path / "ours"))
    transformers.IJepaModel(config).save_pretrained(str(tmp_path / "theirs"))
    ours, _ = read_safetensors(tmp_path / "ours" / "model.safetensors")
    theirs, _ = read_safetensors(tmp_path / "theirs" / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert "encoder.layer.11.attention.attention.value.bias" in ours and "layernorm.weight" in ours


def test_hf_folder_loads_as_our_encoder(tmp_path):
    """A folder written by transformers itself (random weights) imports into our encoder, same outputs."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    torch.manual_seed(0)
    config = transformers.IJepaConfig(
        hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=384,
        image_size=28, patch_size=7, layer_norm_eps=1e-6,
    )  # fmt: skip
    model = transformers.IJepaModel(config).eval()
    with torch.no_grad():  # LayerNorms away from 1/0, so that a swapped weight and bias shows
        for name, param in model.named_parameters():
            if "layernorm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(str(tmp_path / "hf"))
    loaded = load_encoder(tmp_path / "hf")
    assert (loaded.format, loaded.which) == ("hf", "encoder")  # Hugging Face's converter takes the context encoder
    assert (loaded.spec.embed_dim, loaded.spec.depth, loaded.spec.num_heads, loaded.spec.img_size) == (96, 2, 4, 28)
    x = images(2, size=28)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encoder.eval()(x), hf_features(model, x), atol=1e-5, rtol=0)
    # the file itself and ijepa-eval's --model check lead to the same folder
    assert load_encoder(tmp_path / "hf" / "model.safetensors").spec == loaded.spec
    with pytest.raises(ValueError, match="patch 7"):
        load_encoder(tmp_path / "hf", patch_size=16)


def test_hf_round_trip_keeps_which_and_every_weight(authors_file, tmp_path):
    pytest.importorskip("safetensors", reason="safetensors is not installed (pip install safetensors)")
    target = load_encoder(authors_file).encoder
    assert export_cli.export_main([str(authors_file), "--hf", str(tmp_path / "hf")]) == 0  # default: target
    back = load_encoder(tmp_path / "hf")
    assert (back.format, back.which, back.spec) == ("hf", "target_encoder", EncoderSpec.of(target))
    a, b = target.state_dict(), back.encoder.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("destination", ["--hf", "--out"])
def test_an_export_holds_no_local_path(tmp_path, capsys, destination):
    pytest.importorskip("safetensors", reason="safetensors is not installed (pip install safetensors)")
    run_dir = write_our_run(tmp_path / "private" / "run")
    folder = tmp_path / "export"
    out = folder if destination == "--hf" else folder / "encoder.safetensors"
    assert export_cli.export_main([str(run_dir), destination, str(out)]) == 0
    capsys.readouterr()
    files = [f for f in folder.rglob("*") if f.is_file()]
    assert files and not [f for f in files if str(tmp_path).encode() in f.read_bytes()]
    _, meta = read_safetensors(next(folder.rglob("*.safetensors")))
    assert meta["ijepa_fast.source" if destination == "--hf" else "source"] == "ckpt-00000010.pt"


def test_hf_config_our_encoder_cannot_compute_is_refused_by_key(authors_file, tmp_path, capsys):
    pytest.importorskip("safetensors", reason="safetensors is not installed (pip install safetensors)")
    export_hf(load_encoder(authors_file).encoder, tmp_path / "hf")
    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())
    for key, value in (("layer_norm_eps", 1e-12), ("hidden_act", "relu"), ("qkv_bias", False)):
        config_path.write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=f"config.json: {key}="):
            load_encoder(tmp_path / "hf")
    config_path.write_text(json.dumps({k: v for k, v in config.items() if k != "layer_norm_eps"}))
    assert export_cli.export_main([str(tmp_path / "hf"), "--out", str(tmp_path / "x.safetensors")]) == 1
    assert "layer_norm_eps=1e-12" in capsys.readouterr().err  # IJepaConfig's default is not the authors' 1e-6
    (tmp_path / "hf" / "model.safetensors").unlink()
    config_path.write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_encoder(tmp_path / "hf")


@pytest.mark.parametrize(
    "case",
    ["config a list", "config not JSON", "hidden_size abc", "no heads", "heads not dividing", "weights a list"],
)
def test_a_malformed_hf_folder_is_one_line_naming_the_file_and_the_key(case, authors_file, tmp_path, capsys):
    folder = tmp_path / "hf"
    export_hf(load_encoder(authors_file).encoder, folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    edits = {
        "config a list": ([config], f"{config_path}: expected a JSON object, found a list"),
        "config not JSON": (None, f"{config_path} is not valid JSON (line 1, column 2"),
        "hidden_size abc": ({**config, "hidden_size": "abc"}, f"{config_path}: hidden_size='abc' must be a positive"),
        "no heads": ({**config, "num_attention_heads": 0}, f"{config_path}: num_attention_heads=0 must be a positive"),
        "heads not dividing": (
            {**config, "num_attention_heads": 5},
            f"{config_path}: num_attention_heads=5 does not divide hidden_size=192",
        ),
        "weights a list": (config, f"{folder / 'pytorch_model.bin'} holds a list, not a state dict"),
    }
    content, message = edits[case]
    config_path.write_text("{,}" if content is None else json.dumps(content))
    if case == "weights a list":
        (folder / "model.safetensors").unlink()
        torch.save([torch.zeros(2)], folder / "pytorch_model.bin")
    with pytest.raises(ValueError) as err:
        load_encoder(folder)
    assert str(err.value).startswith(message), str(err.value)
    assert export_cli.export_main([str(folder), "--out", str(tmp_path / "x.safetensors")]) == 1
    assert one_error_line("ijepa-export", capsys) == f"ijepa-export: {err.value}"
    assert not (tmp_path / "x.safetensors").exists()


def test_a_which_a_one_encoder_file_cannot_give_is_one_line_naming_what_it_holds(tmp_path, capsys):
    """A .safetensors export and a Hugging Face folder hold one encoder: --which naming the other is
    refused (it was ignored, and the reports named the encoder held); left out, the held one is used."""
    pytest.importorskip("safetensors", reason="safetensors is not installed (pip install safetensors)")
    run_dir, data = write_our_run(tmp_path / "run"), write_idx_data(tmp_path / "data", n_train=8, n_test=4)
    single, hf = tmp_path / "exp" / "target.safetensors", tmp_path / "exp" / "hf"
    assert export_cli.export_main([str(run_dir), "--out", str(single)]) == 0
    assert export_cli.export_main([str(run_dir), "--hf", str(hf), "--which", "context"]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    for source, held, asked in ((single, "target", "encoder"), (hf, "context", "target")):
        message = f"ijepa-export: {source} holds one encoder, the {held} one"
        assert export_cli.export_main([str(source), "--which", asked, "--out", str(out / "x.safetensors")]) == 2
        assert one_error_line("ijepa-export", capsys).startswith(message)
        argv = [str(source), "--which", asked, "--data", str(data), "--out", str(out / "r.json"), "--no-progress"]
        assert eval_cli.main(argv) == 2
        assert one_error_line("ijepa-eval", capsys).startswith(message.replace("export", "eval"))
        assert not out.exists()
    assert export_cli.export_main([str(hf), "--which", "context", "--out", str(out / "c.safetensors")]) == 0
    assert export_cli.export_main([str(hf), "--out", str(out / "d.safetensors")]) == 0
    assert {read_safetensors(out / f"{x}.safetensors")[1]["which"] for x in "cd"} == {"encoder"}


def test_a_size_a_file_with_its_own_config_does_not_have_is_one_line_naming_its_own(tmp_path, capsys):
    """--model and --patch are for files without a config; a file with one names its own in one line
    (the tensors' misfit listed every key). The same option on the authors' file still lists them."""
    pytest.importorskip("safetensors", reason="safetensors is not installed (pip install safetensors)")
    run_dir = write_our_run(tmp_path / "run")
    single = tmp_path / "enc.safetensors"
    assert export_cli.export_main([str(run_dir), "--out", str(single)]) == 0
    capsys.readouterr()
    out = tmp_path / "x.safetensors"
    ours = f"{run_dir / 'checkpoints' / ckpt_mod.checkpoint_name(10)}'s config"
    for source, where in ((run_dir, ours), (single, str(single))):
        assert export_cli.export_main([str(source), "--model", "vit_huge", "--out", str(out)]) == 2
        line = one_error_line("ijepa-export", capsys)
        assert line == f"ijepa-export: {where} describes model 'vit_tiny', not --model 'vit_huge': leave --model out"
        assert export_cli.export_main([str(source), "--patch", "16", "--out", str(out)]) == 2
        assert one_error_line("ijepa-export", capsys).endswith("describes patch 7, not --patch 16: leave --patch out")
        assert not out.exists()
    assert export_cli.export_main([str(single), "--model", "vit_tiny", "--patch", "7", "--out", str(out)]) == 0


def test_hf_export_leaves_no_partial_file_when_writing_fails(authors_file, tmp_path, monkeypatch):
    st = pytest.importorskip("safetensors.torch", reason="safetensors is not installed")

    def disk_full(tensors, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise OSError("No space left on device")

    monkeypatch.setattr(st, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        export_hf(load_encoder(authors_file).encoder, tmp_path / "hf")
    assert list((tmp_path / "hf").iterdir()) == []


@pytest.mark.slow
def test_hf_export_of_the_vit_h14_shape(tmp_path):
    """ViT-H/14 at 224 px (random weights): the shape of facebook/ijepa_vith14_1k, one image."""
    spec = EncoderSpec(1280, 32, 16, 14, 224, 4.0, "vit_huge")
    encoder = spec.build(device="meta").to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if name != "pos_embed":  # keep the fixed sin-cos table: to_empty left it uninitialised
                param.normal_(0.0, 0.02, generator=g)
        encoder.pos_embed.copy_(torch.from_numpy(sincos_pos_embed_2d(1280, 16)).float()[None])
    export_hf(encoder.eval(), tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]) == (1280, 32, 16)
    assert (config["intermediate_size"], config["patch_size"], config["image_size"]) == (5120, 14, 224)
    model = hf_model(tmp_path / "hf")
    x = images(1, size=224)
    with torch.no_grad():
        ours = encoder(x)
    torch.testing.assert_close(hf_features(model, x), ours, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- command lines


def test_ijepa_export(authors_file, tmp_path, capsys):
    pytest.importorskip("safetensors", reason="safetensors is not installed (pip install safetensors)")
    out = tmp_path / "enc.safetensors"
    assert export_cli.export_main([str(authors_file), "--out", str(out), "--which", "encoder"]) == 0
    back, _, meta = load_safetensors_encoder(out)
    assert meta["which"] == "encoder" and meta["source_format"] == "authors"
    raw = strip_module_prefix(torch.load(authors_file, weights_only=True)["encoder"])
    assert all(torch.equal(v, raw[k]) for k, v in back.state_dict().items())
    timm_out = tmp_path / "timm.safetensors"
    assert export_cli.export_main([str(authors_file), "--out", str(timm_out), "--timm"]) == 0
    tensors, meta = read_safetensors(timm_out)
    assert set(tensors) == expected_timm_keys(DEPTH) and json.loads(meta["timm_kwargs"])["fc_norm"] is False
    assert "timm kwargs" in capsys.readouterr().out
    assert export_cli.export_main([str(authors_file), "--out", str(out), "--model", "vit_base"]) == 1
    assert "vs" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".npy", ".safetensors"])
def test_ijepa_extract(authors_file, tmp_path, suffix):
    if suffix == ".safetensors":
        pytest.importorskip("safetensors", reason="safetensors is not installed (pip install safetensors)")
    data = write_idx_data(tmp_path / "data", n_train=20, n_test=4)
    out = tmp_path / f"feats{suffix}"
    rc = export_cli.extract_main(
        [
            str(authors_file),
            "--data",
            str(data),
            "--split",
            "test",
            "--out",
            str(out),
            "--no-progress",
            "--batch-size",
            "3",
        ]
    )
    assert rc == 0
    if suffix == ".npy":
        feats, labels = np.load(out), np.load(tmp_path / "feats.labels.npy")
    else:
        tensors, meta = read_safetensors(out)
        feats, labels = tensors["features"].numpy(), tensors["labels"].numpy()
        assert meta["which"] == "target_encoder" and meta["split"] == "test"
    assert feats.shape == (4, D) and labels.shape == (4,)
    # the same as extracting in-process from the same dataset
    from ijepa_fast.config import DataConfig
    from ijepa_fast.data.evaluation import build_eval_dataset

    dataset = build_eval_dataset(DataConfig(dataset="idx", root=str(data), crop_size=IMG), split="test")
    ref, ref_y = extract_features(load_encoder(authors_file).encoder, dataset, progress=False)
    np.testing.assert_allclose(feats, ref.numpy(), rtol=1e-5, atol=1e-5)
    assert np.array_equal(labels, ref_y.numpy())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--device", "banana"], "--device='banana' is invalid: expected auto, cpu, cuda or cuda:N"),
        (["--limit", "-5"], "--limit=-5 is invalid: expected an integer >= 0 (0: all)"),
        (["--img-size", "0"], "argument --img-size: 0: must be at least 1"),
    ],
)
def test_ijepa_extract_refuses_a_bad_option_in_one_line_naming_it(extra, message, authors_file, tmp_path, capsys):
    argv = [str(authors_file), "--data", str(tmp_path / "data"), "--out", str(tmp_path / "f.npy"), *extra]
    with pytest.raises(SystemExit) as exit_:
        export_cli.extract_main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"ijepa-extract: error: {message}"
    assert list(tmp_path.iterdir()) == []


def test_ijepa_extract_image_folder_names_each_row(authors_file, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / cls / f"{i}.png")
    out = tmp_path / "f.npy"
    rc = export_cli.extract_main(
        [
            str(authors_file),
            "--data",
            str(tmp_path / "imgs"),
            "--dataset",
            "folder",
            "--out",
            str(out),
            "--no-progress",
            "--num-workers",
            "0",
        ]
    )
    assert rc == 0
    assert np.load(out).shape == (6, D) and np.load(tmp_path / "f.labels.npy").tolist() == [0, 0, 0, 1, 1, 1]
    rows = (tmp_path / "f.paths.txt").read_text().split()
    assert len(rows) == 6 and rows[0].endswith("0.png") and "cat" in rows[0] and "dog" in rows[-1]


# ----------------------------------------------------------------------------- output paths


def _run_export_or_extract(tool: str, args: list[str]) -> int:
    main = export_cli.extract_main if tool == "ijepa-extract" else export_cli.export_main
    return main(args)


@pytest.mark.parametrize(
    "tool, option, case",
    [
        ("ijepa-export", "--out", "a folder"),
        ("ijepa-export", "--out", "a file as parent"),
        ("ijepa-export", "--timm", "a file as parent"),
        ("ijepa-export", "--hf", "a file"),
        ("ijepa-export", "--hf", "a file as parent"),
        ("ijepa-export", "--out", "read-only"),
        ("ijepa-extract", "--out", "a folder"),
        ("ijepa-extract", "--out", "a file as parent"),
        ("ijepa-extract", "--out", "read-only"),
    ],
)
def test_an_output_that_cannot_be_written_is_one_line_before_any_work(
    tool, option, case, tmp_path, capsys, monkeypatch
):
    """Checked first: the checkpoint and data here do not exist, and the error is the output's path."""
    (tmp_path / "afile").write_text("mine")
    name = "f.npy" if tool == "ijepa-extract" else "x.safetensors"
    if case == "a folder":
        out = tmp_path / name
        out.mkdir()
        expected = f"{option} {out} is a folder, not a file: give a file name, e.g. {out / 'name'}, or choose another"
    elif case == "a file":
        out = tmp_path / "afile"
        expected = f"{option} {out} is a file, not a folder: move it away or choose another {option}"
    elif case == "a file as parent":
        out = tmp_path / "afile" / ("hf" if option == "--hf" else name)
        shown = "--out" if option == "--timm" else option
        expected = f"{shown} {out}: {tmp_path / 'afile'} is a file, not a folder: move that file away"
    else:
        from ijepa_fast.io import outputs

        def refused(folder):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(outputs, "probe_write", refused)  # as a read-only folder does for a user
        out = tmp_path / name
        expected = f"{option} {out} cannot be written ({tmp_path}: Permission denied): make it writable"
    args = [str(tmp_path / "no-checkpoint.pt")]
    args += ["--hf", str(out)] if option == "--hf" else ["--out", str(out)] + (["--timm"] if option == "--timm" else [])
    if tool == "ijepa-extract":
        args += ["--data", str(tmp_path / "nowhere")]
    before = sorted(tmp_path.rglob("*"))
    assert _run_export_or_extract(tool, args) == 1
    assert one_error_line(tool, capsys).startswith(f"{tool}: {expected}")
    assert sorted(tmp_path.rglob("*")) == before and (tmp_path / "afile").read_text() == "mine"


def _with_file_size_limit(limit: int):
    def preexec():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


@pytest.mark.parametrize(
    "tool, option",
    [("ijepa-extract", "--out"), ("ijepa-export", "--out"), ("ijepa-export", "--timm"), ("ijepa-export", "--hf")],
)
def test_a_full_disk_is_one_line_and_leaves_the_earlier_files_as_they_were(tool, option, authors_file, tmp_path):
    """A file-size limit makes every write past 4 KiB fail, as a full disk does: the user's earlier
    files stay whole, no partial or temporary file is left, and the error names the file."""
    if option != "--out" or tool == "ijepa-export":
        pytest.importorskip("safetensors", reason="safetensors is not installed (pip install safetensors)")
    out = tmp_path / "out"
    out.mkdir()
    if option == "--hf":
        target, args = out / "model.safetensors", ["--hf", str(out)]
        (out / "config.json").write_text(json.dumps({"ijepa_fast": {}}))  # an earlier export: may be replaced
    elif tool == "ijepa-extract":
        data = write_idx_data(tmp_path / "data", n_train=40, n_test=4)
        target, args = out / "f.npy", ["--out", str(out / "f.npy"), "--data", str(data), "--no-progress"]
        (out / "f.labels.npy").write_bytes(b"earlier labels")
    else:
        target, args = out / "x.safetensors", ["--out", str(out / "x.safetensors")]
        args += ["--timm"] if option == "--timm" else []
    target.write_bytes(b"earlier")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    entry = "extract_main" if tool == "ijepa-extract" else "export_main"
    code = f"import sys; from ijepa_fast.cli.export import {entry}; sys.exit({entry}(sys.argv[1:]))"
    proc = subprocess.run(
        [sys.executable, "-c", code, str(authors_file), *args],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_with_file_size_limit(4096),
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"{tool}: {target} could not be written ("), lines
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_hf_export_refuses_a_folder_of_the_users(authors_file, tmp_path, capsys):
    """Its README.md and config.json would be replaced: refused in one line, before loading."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "README.md").write_text("my notes")
    (folder / "config.json").write_text('{"model_type": "vit"}')
    assert export_cli.export_main([str(authors_file), "--hf", str(folder)]) == 1
    assert one_error_line("ijepa-export", capsys) == (
        f"ijepa-export: {folder} is not empty and is not an earlier export of ijepa-export --hf (no config.json with "
        "an 'ijepa_fast' entry), so its files would be replaced: export into a new or empty folder"
    )
    assert (folder / "README.md").read_text() == "my notes" and sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
    ]
    with pytest.raises(ValueError, match="is not empty"):  # the library refuses it too
        export_hf(load_encoder(authors_file).encoder, folder)


def test_hf_export_replaces_an_earlier_export(authors_file, tmp_path, capsys):
    pytest.importorskip("safetensors", reason="safetensors is not installed (pip install safetensors)")
    folder = tmp_path / "hf"
    export_hf(load_encoder(authors_file).encoder, folder)  # no provenance: still marked as ours
    assert export_cli.export_main([str(authors_file), "--hf", str(folder), "--which", "encoder"]) == 0
    assert json.loads((folder / "config.json").read_text())["ijepa_fast"]["which"] == "encoder"
    assert load_encoder(folder).which == "encoder"
