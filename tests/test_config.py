"""Config loading: the authors' YAML files, ours, overrides, and errors that name the key."""

from __future__ import annotations

import dataclasses
import re
import typing
import warnings
from pathlib import Path

import pytest
import yaml

from ijepa_fast import config
from ijepa_fast.cli import pretrain
from ijepa_fast.config import AUTHORS_SPEED, Config, ConfigError
from ijepa_fast.config.authors import is_authors_format, translate
from tests.test_trainer import one_error_line

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# What each of the authors' files must load into: (model name, patch, pred depth, pred width),
# (crop size, per-GPU batch), (epochs, warm-up epochs). All four share the rest of the recipe.
AUTHORS = {
    "in1k_vith14_ep300.yaml": (("vit_huge", 14, 12, 384), (224, 128), (300, 40)),
    "in1k_vith16-448_ep300.yaml": (("vit_huge", 16, 12, 384), (448, 16), (300, 40)),
    "in22k_vith14_ep66.yaml": (("vit_huge", 14, 12, 384), (224, 32), (66, 3)),
    "in22k_vitg16_ep44.yaml": (("vit_giant", 16, 16, 384), (224, 16), (44, 3)),
}
OURS = ("vitb16_in1k.yaml", "vits16_in1k.yaml", "demo.yaml")


def _write(tmp_path: Path, data: dict, name: str = "c.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _authors_raw(name: str = "in1k_vith14_ep300.yaml") -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


# ----------------------------------------------------------------------------- the authors' files


@pytest.mark.parametrize("name", sorted(AUTHORS))
def test_authors_config_loads_expected_values(name):
    (model, patch, depth, width), (crop, batch), (epochs, warmup) = AUTHORS[name]
    assert is_authors_format(_authors_raw(name))
    with pytest.warns(UserWarning, match="logging.folder=.*placeholder"):
        cfg = config.load(str(CONFIGS / name))
    m = cfg.model
    assert (m.name, m.patch_size, m.pred_depth, m.pred_emb_dim) == (model, patch, depth, width)
    assert (cfg.data.crop_size, cfg.data.batch_size, cfg.data.crop_scale) == (crop, batch, (0.3, 1.0))
    assert (cfg.data.num_workers, cfg.data.pin_memory) == (10, True)
    assert cfg.data.root == "$replace_this_with_absolute_path_to_your_datasets_directory/imagenet_full_size/061417/"
    m = cfg.mask
    assert (m.num_pred_masks, m.min_keep, m.allow_overlap) == (4, 11, False)  # their 10: more than 10 kept
    assert (m.pred_scale, m.enc_scale, m.aspect_ratio) == ((0.15, 0.2), (0.85, 1.0), (0.75, 1.5))
    o = cfg.optim
    assert (o.epochs, o.warmup_epochs, o.ipe_scale) == (epochs, warmup, 1.0)
    assert (o.start_lr, o.lr, o.final_lr) == (2e-4, 1e-3, 1e-6)
    assert (o.weight_decay, o.final_weight_decay, o.ema) == (0.04, 0.4, (0.996, 1.0))
    assert (cfg.run.dtype, cfg.run.name) == ("auto", "jepa")  # use_bfloat16: true; write_tag
    assert cfg.run.out_dir == "runs"  # their logging.folder is a placeholder: never a folder name


def test_an_authors_min_keep_keeps_more_context_patches_than_it_as_their_sampler(tmp_path):
    """Their sampler redraws a context of min_keep patches or fewer (len(mask) > min_keep); ours keeps
    at least min_keep, so their file's 10 is our 11. On a 6x6 grid contexts of exactly 10 patches
    come up (their sampler never returns one)."""
    from ijepa_fast.masks.sampler import MultiBlockMaskSampler

    raw = _authors_raw()
    raw["mask"]["min_keep"] = 10
    with pytest.warns(UserWarning, match="placeholder"):
        cfg = config.load(_write(tmp_path, raw))
    assert cfg.mask.min_keep == 11
    sampler = MultiBlockMaskSampler(6, min_keep=cfg.mask.min_keep, seed=0)
    assert min(sampler(16, step).context.shape[1] for step in range(300)) == 11
    raw["mask"]["min_keep"] = "ten"
    with pytest.warns(UserWarning), pytest.raises(config.ConfigError, match="mask.min_keep"):
        config.load(_write(tmp_path, raw))


def test_authors_logging_folder_is_the_out_dir_unless_a_placeholder(tmp_path):
    raw = _authors_raw()
    raw["logging"]["folder"] = "/logs/ijepa"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert config.load(_write(tmp_path, raw)).run.out_dir == "/logs/ijepa"
    raw["logging"]["folder"] = "$replace_this_with_path_for_experiment_logs/vith14/"
    with pytest.warns(UserWarning, match=r"logging\.folder=.*placeholder.*run\.out_dir"):
        cfg = config.load(_write(tmp_path, raw), ["run.out_dir=/scratch/runs"])
    assert cfg.run.out_dir == "/scratch/runs"
    with pytest.warns(UserWarning, match="placeholder"):
        assert config.load(_write(tmp_path, raw)).run.out_dir == "runs"


def test_authors_format_detection():
    assert is_authors_format({"meta": {}, "optimization": {}})
    assert is_authors_format({"data": {}, "logging": {}})
    assert is_authors_format({"meta": {}, "optimisation": {}})  # a misspelt section: translate names it
    assert not is_authors_format({"model": {}, "optim": {}})
    assert not is_authors_format({"data": {}, "mask": {}})  # the shared sections alone: ours
    assert not is_authors_format({"meta": {}, "run": {}})  # any section only ours have: ours


def test_authors_translation_rules(tmp_path):
    raw = _authors_raw()
    raw["meta"]["use_bfloat16"] = False
    raw["data"]["root_path"] = "/data"
    raw["data"]["image_folder"] = "imagenet"
    out = translate(raw)
    assert out["run"]["dtype"] == "fp32"
    assert out["data"]["root"] == "/data/imagenet"
    assert out["optim"]["warmup_epochs"] == 40 and "warmup" not in out["optim"]
    assert out["model"]["patch_size"] == 14 and "patch_size" not in out["mask"]
    assert out["data"]["pin_memory"] is True
    # A partial authors' file is fine: the rest keeps our defaults.
    cfg = config.load(_write(tmp_path, {"optimization": {"lr": 5e-4, "warmup": 2.5}}))
    assert (cfg.optim.lr, cfg.optim.warmup_epochs, cfg.model.name) == (5e-4, 2.5, "vit_huge")


def test_authors_overrides_in_our_keys(tmp_path):
    cfg = config.load(str(CONFIGS / "in1k_vith14_ep300.yaml"), ["data.root=/data/in1k", "optim.lr=5e-4"])
    assert (cfg.data.root, cfg.optim.lr, cfg.optim.start_lr) == ("/data/in1k", 5e-4, 2e-4)


@pytest.mark.parametrize(
    "key,value",
    [
        ("use_horizontal_flip", True),
        ("use_gaussian_blur", True),
        ("use_color_distortion", True),
        ("color_jitter_strength", 0.4),
    ],
)
def test_authors_augmentations_on_are_rejected(tmp_path, key, value):
    raw = _authors_raw()
    raw["data"][key] = value
    with pytest.raises(ConfigError, match=rf"data\.{key}=.*not supported"):
        config.load(_write(tmp_path, raw))


def test_authors_checkpoint_keys_warn_and_are_ignored(tmp_path):
    raw = _authors_raw()
    raw["logging"]["folder"] = str(tmp_path / "logs")  # not their placeholder, which warns
    raw["meta"]["copy_data"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config.load(_write(tmp_path, raw))  # copy_data: silently ignored
    raw["meta"]["load_checkpoint"] = True
    with pytest.warns(UserWarning, match="--resume"):
        config.load(_write(tmp_path, raw))


@pytest.mark.parametrize(
    "section,bad,nearest",
    [("optimization", "warmpu", "warmup"), ("data", "pin_memory", "pin_mem"), ("meta", "model", "model_name")],
)
def test_authors_misspelt_key_names_nearest(tmp_path, section, bad, nearest):
    raw = _authors_raw()
    raw[section][bad] = 1
    with pytest.raises(ConfigError, match=rf"'{section}\.{bad}'.*did you mean '{nearest}'"):
        config.load(_write(tmp_path, raw))


def test_authors_misspelt_section_is_named(tmp_path):
    raw = _authors_raw()
    raw["optimisation"] = raw.pop("optimization")
    with pytest.raises(ConfigError, match=r"'optimisation'.*did you mean 'optimization'"):
        config.load(_write(tmp_path, raw))


def test_authors_bad_value_is_type_checked(tmp_path):
    raw = _authors_raw()
    raw["optimization"]["epochs"] = "many"
    with pytest.raises(ConfigError, match=r"optim\.epochs='many'.*integer"):
        config.load(_write(tmp_path, raw))
    raw = _authors_raw()
    raw["meta"]["use_bfloat16"] = "sometimes"
    with pytest.raises(ConfigError, match=r"meta\.use_bfloat16"):
        config.load(_write(tmp_path, raw))


# ----------------------------------------------------------------------------- our files


@pytest.mark.parametrize("name", OURS)
def test_our_configs_load(name):
    raw = yaml.safe_load((CONFIGS / name).read_text())
    assert not is_authors_format(raw)
    cfg = config.load(str(CONFIGS / name))
    assert cfg.data.crop_size % cfg.model.patch_size == 0


def test_our_configs_values():
    b = config.load(str(CONFIGS / "vitb16_in1k.yaml"))
    assert (b.model.name, b.model.patch_size, b.model.pred_depth, b.model.pred_emb_dim, b.optim.epochs) == (
        "vit_base",
        16,
        6,
        384,
        600,
    )
    s = config.load(str(CONFIGS / "vits16_in1k.yaml"))
    assert (s.model.name, s.model.patch_size) == ("vit_small", 16)
    d = config.load(str(CONFIGS / "demo.yaml"))
    # what `make demo` promises: a 4-block ViT-tiny on the IDX files, on the CPU, four epochs
    assert (d.model.name, d.model.depth, d.data.dataset, d.data.root, d.run.device, d.optim.epochs) == (
        "vit_tiny",
        4,
        "idx",
        "/usr/share/datasets/fashion-mnist",
        "cpu",
        4,
    )
    grid = d.data.crop_size // d.model.patch_size
    assert d.data.crop_size % d.model.patch_size == 0 and d.mask.min_keep < grid * grid


def test_every_yaml_starts_with_a_comment():
    files = sorted(CONFIGS.glob("*.yaml"))
    assert {f.name for f in files} >= set(AUTHORS) | set(OURS)
    for f in files:
        assert f.read_text().startswith("# "), f.name


def test_our_misspelt_key_names_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"'optim\.warmup_epoch'.*did you mean 'warmup_epochs'"):
        config.load(_write(tmp_path, {"optim": {"warmup_epoch": 3}}))


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config section 'optimizer'.*did you mean 'optim'"):
        config.load(_write(tmp_path, {"optimizer": {"lr": 1e-3}}))


@pytest.mark.parametrize(
    "section,key,value,allowed",
    [
        ("mask", "pred_scale", [0.0, 0.2], r"0\.0 < lo <= hi <= 1\.0"),
        ("mask", "pred_scale", [0.15, 1.5], r"0\.0 < lo <= hi <= 1\.0"),
        ("data", "batch_size", 0, r"integer >= 1"),
        ("optim", "warmup_epochs", 500, r"\[0, epochs=300\]"),
        ("model", "name", "vit_huuge", r"one of"),
        ("model", "depth", -1, r"integer >= 0"),
    ],
)
def test_bad_value_names_key_and_range(tmp_path, section, key, value, allowed):
    with pytest.raises(ConfigError, match=rf"{section}\.{key}=.*{allowed}"):
        config.load(_write(tmp_path, {section: {key: value}}))


def _float_keys() -> list[tuple[str, bool]]:
    """(section.key, is a pair) of every float field, read from the dataclasses' annotations."""
    keys = []
    for section, section_cls in typing.get_type_hints(Config).items():
        for key, hint in typing.get_type_hints(section_cls).items():
            if hint is float or typing.get_args(hint) == (float, float):
                keys.append((f"{section}.{key}", hint is not float))
    return keys


@pytest.mark.parametrize("key,pair", _float_keys())
@pytest.mark.parametrize("bad", ["inf", "-inf", "nan"])
def test_every_float_key_rejects_inf_and_nan_naming_the_key(key, pair, bad):
    value = f"[{bad}, 1.0]" if pair else bad
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}=.*finite"):
        config.load(None, [f"{key}={value}"])


def test_inf_in_a_yaml_file_is_rejected_naming_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: .inf\n")
    with pytest.raises(ConfigError, match=r"optim\.lr=inf is invalid: expected a finite number"):
        config.load(str(path))


@pytest.mark.parametrize("device", ["banana", "mps", "cuda:", "cuda:x", "CPU", "cpu:0"])
def test_a_device_resolve_device_does_not_take_is_one_line_before_anything_is_made(device, tmp_path, capsys):
    argv = ["--config", "demo", f"run.out_dir={tmp_path / 'runs'}", f"run.device={device}"]
    assert pretrain.main(argv) == 2
    line = one_error_line(capsys)
    assert f"run.device={device!r} is invalid: expected auto, cpu, cuda or cuda:N" in line
    assert list(tmp_path.iterdir()) == []


def test_every_device_form_resolve_device_takes_loads():
    for device in ("auto", "cpu", "cuda", "cuda:0", "cuda:3"):
        assert config.load("demo", [f"run.device={device}"]).run.device == device


def test_crop_must_be_a_multiple_of_patch():
    with pytest.raises(ConfigError, match=r"data\.crop_size=225.*multiple of model\.patch_size=14"):
        config.load(None, ["data.crop_size=225"])


# ----------------------------------------------------------------------------- overrides, presets, save


def test_overrides_are_coerced_and_checked():
    cfg = config.load(
        None,
        [
            "optim.lr=5e-4",
            "mask.aspect_ratio=0.5,2",
            "data.pin_memory=false",
            "run.tensorboard=off",
            "optim.warmup_epochs=0.5",
            "data.batch_size=64",
        ],
    )
    assert cfg.optim.lr == 5e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.mask.aspect_ratio == (0.5, 2.0)
    assert (cfg.data.pin_memory, cfg.run.tensorboard) == (False, False)
    assert (cfg.optim.warmup_epochs, cfg.data.batch_size) == (0.5, 64)
    with pytest.raises(ConfigError, match=r"optim\.lr='fast'.*number"):
        config.load(None, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"data\.pin_memory='maybe'.*true or false"):
        config.load(None, ["data.pin_memory=maybe"])
    with pytest.raises(ConfigError, match=r"data\.batch_size='1.5'.*integer"):
        config.load(None, ["data.batch_size=1.5"])
    with pytest.raises(ConfigError, match=r"mask\.aspect_ratio.*pair"):
        config.load(None, ["mask.aspect_ratio=0.5"])
    with pytest.raises(ConfigError, match=r"'optim\.lrr'.*did you mean 'lr'"):
        config.load(None, ["optim.lrr=1e-3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        config.load(None, ["optim.lr"])


def test_speed_preset_authors_with_explicit_key_winning(tmp_path):
    cfg = config.load(None, ["speed.preset=authors"])
    for key, value in AUTHORS_SPEED.items():
        assert getattr(cfg.speed, key) == value, key
    assert not config.load(None).speed.grad_scaler  # fast side by default
    cfg = config.load(_write(tmp_path, {"speed": {"preset": "authors", "fused_ema": True, "attention": "sdpa"}}))
    assert (cfg.speed.fused_ema, cfg.speed.attention, cfg.speed.fused_gather) == (True, "sdpa", False)
    cfg = config.load(None, ["speed.preset=authors", "speed.compile=on"])
    assert (cfg.speed.compile, cfg.speed.sync_every_step) == ("on", True)


@pytest.mark.parametrize("name", sorted(AUTHORS) + list(OURS))
def test_save_load_round_trip(tmp_path, name):
    cfg = config.load(str(CONFIGS / name), ["speed.preset=authors", "optim.lr=3e-4"])
    path = str(tmp_path / "resolved.yaml")
    config.save(cfg, path)
    again = config.load(path)
    assert again == cfg
    assert not is_authors_format(yaml.safe_load(Path(path).read_text()))
    assert isinstance(again, Config) and dataclasses.asdict(again) == dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------- files that do not load, via the CLI


def test_a_config_path_that_is_a_folder_is_one_line_naming_it(tmp_path, capsys):
    assert pretrain.main(["--config", str(tmp_path)]) == 2
    assert f"config file {tmp_path} is a folder" in one_error_line(capsys)


@pytest.mark.parametrize(
    "text,bad_line,where,extra",
    [
        # a key indented deeper than its sibling: the parser fails at its colon
        ("run:\n  name: a\n   seed: 1\n", 3, "   seed:", ""),
        # an unclosed list: the parser fails at the end of the file and names where the list starts
        ("run:\n  name: a\n  seed: [1, 2\n", 4, None, "that starts at line 3, column 9"),
    ],
)
def test_malformed_yaml_names_the_line_and_column(tmp_path, capsys, text, bad_line, where, extra):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert pretrain.main(["--config", str(path)]) == 2
    column = len(where) if where else 1  # 1-based: the colon of `where`, or the start of the line
    line = one_error_line(capsys)
    assert f"{path} is not valid YAML at line {bad_line}, column {column}" in line and extra in line


# ----------------------------------------------------------------------------- which file --config names


@pytest.mark.parametrize("form", ["demo", "demo.yaml", "configs/demo.yaml", "./configs/demo.yaml"])
def test_packaged_config_loads_by_name_or_as_the_docs_write_it_from_any_folder(tmp_path, monkeypatch, form):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    assert config.load(form, ["optim.lr=5e-4"]) == config.load(str(CONFIGS / "demo.yaml"), ["optim.lr=5e-4"])


def test_a_config_file_that_exists_wins_over_the_packaged_one_of_its_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    local = _write(tmp_path / "configs", {"run": {"name": "mine"}}, name="demo.yaml")
    assert config.load("configs/demo.yaml").run.name == config.load(local).run.name == "mine"


@pytest.mark.parametrize("form", ["nope", "configs/nope.yaml", "elsewhere/demo.yaml"])
def test_a_config_that_is_neither_a_file_nor_packaged_is_one_line_listing_the_packaged(
    tmp_path, monkeypatch, capsys, form
):
    monkeypatch.chdir(tmp_path)
    assert pretrain.main(["--config", form]) == 2
    line = one_error_line(capsys)
    packaged = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
    assert f"config file {form} does not exist" in line and ", ".join(packaged) in line
    assert list(tmp_path.iterdir()) == []
