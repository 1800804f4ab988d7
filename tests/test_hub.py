"""One-call loading: the checkout's ``hubconf.py`` through ``torch.hub.load(..., source="local")`` gives
the encoder the direct loader gives, from our checkpoints, the authors' and a Hugging Face export; it
imports nothing beyond the standard library itself. The Hugging Face export's model card names the
encoder, the training config and the run's reports, and holds no local path."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from ijepa_fast import config as config_mod
from ijepa_fast.cli import export as export_cli
from ijepa_fast.io.encoder import EncoderSpec
from ijepa_fast.io.hub import HUB_ENTRIES, hub_encoder
from ijepa_fast.io.load import load_encoder
from tests.test_eval import write_our_run
from tests.test_interop import authors_checkpoint

REPO = Path(__file__).resolve().parent.parent


def hub_load(entry: str, **kwargs) -> torch.nn.Module:
    return torch.hub.load(str(REPO), entry, source="local", trust_repo=True, **kwargs)


def assert_same_encoder(a: torch.nn.Module, b: torch.nn.Module, size: int) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Our run folder (the demo's architecture), an authors' .pth.tar (ViT-T/16 at 64 px) and an HF export."""
    root = tmp_path_factory.mktemp("hub")
    run_dir = write_our_run(root / "run", depth=4)
    authors = root / "IN1K-vit.t.16-64px.pth.tar"
    torch.save(authors_checkpoint(), authors)
    assert export_cli.export_main([str(run_dir), "--hf", str(root / "hf"), "--which", "context"]) == 0
    return {"ours": run_dir, "authors": authors, "hf": root / "hf"}


@pytest.mark.parametrize(
    ("source", "entry", "which", "size"),
    [
        ("ours", "ijepa_demo", "target", 28),
        ("authors", "ijepa_vitt16", "context", 64),
        ("hf", "ijepa_demo", "target", 28),
    ],
)
def test_torch_hub_load_gives_the_direct_loaders_encoder(sources, source, entry, which, size):
    direct = load_encoder(sources[source], {"target": "target_encoder", "context": "encoder"}[which]).encoder
    assert_same_encoder(hub_load(entry, weights=str(sources[source]), which=which), direct, size)
    assert_same_encoder(hub_load("ijepa_encoder", weights=str(sources[source]), which=which), direct, size)


def test_an_entry_refuses_weights_of_another_architecture_naming_the_one_that_fits(sources):
    with pytest.raises(ValueError, match=r"not ijepa_vith14's vit_huge/14 at 224 px.*load it with 'ijepa_demo'"):
        hub_load("ijepa_vith14", weights=str(sources["ours"]))


def test_the_hub_lists_one_entry_per_size_and_each_preset_trains_its_entry():
    hubconf = torch.hub._import_module("hubconf", str(REPO / "hubconf.py"))  # what source="local" imports
    listed = {name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")}
    assert listed == {*HUB_ENTRIES, "ijepa_encoder"}  # torch.hub.list's rule (it lists GitHub repos only)
    for name, entry in HUB_ENTRIES.items():
        if entry.preset:
            with warnings.catch_warnings():  # the authors' configs' placeholder log folders
                warnings.simplefilter("ignore")
                cfg = config_mod.load(entry.preset)
            assert (cfg.model.name, cfg.model.patch_size, cfg.data.crop_size) == (
                entry.model,
                entry.patch_size,
                entry.img_size,
            ), name
            assert cfg.model.depth == entry.depth, name
    demo = hub_encoder("ijepa_demo")  # random init, the demo's shape
    assert EncoderSpec.of(demo) == EncoderSpec(192, 4, 3, 7, 28, 4.0, "")


def test_hubconf_imports_with_the_standard_library_alone_and_declares_what_loading_imports(sources):
    """Importing hubconf with the package and every dependency but torch blocked works and loads
    nothing; loading each source then imports no third-party package that hubconf does not declare
    (beyond what torch itself imports)."""
    script = f"""
import importlib.abc, importlib.util, sys
blocked = {{"ijepa_fast", "numpy", "yaml", "safetensors", "torch"}}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"blocked: {{name}}")
sys.meta_path.insert(0, Block())
before = set(sys.modules)
spec = importlib.util.spec_from_file_location("hubconf", {str(REPO / "hubconf.py")!r})
hubconf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(hubconf)
assert set(sys.modules) == before, sorted(set(sys.modules) - before)
sys.meta_path.pop(0)
import torch
baseline = {{m.split(".")[0] for m in sys.modules}}
for entry, weights in (("ijepa_demo", {str(sources["ours"])!r}), ("ijepa_vitt16", {str(sources["authors"])!r}),
                       ("ijepa_demo", {str(sources["hf"])!r})):
    getattr(hubconf, entry)(weights=weights)
new = {{m.split(".")[0] for m in sys.modules}} - baseline - set(sys.stdlib_module_names) - {{"ijepa_fast"}}
import importlib.metadata as md, re
def closure(dist, seen):  # a distribution and what it requires (extras left out), recursively
    key = re.sub(r"[-_.]+", "-", dist).lower()
    if key in seen:
        return seen
    seen.add(key)
    for req in md.requires(dist) or []:
        if "extra ==" not in req:
            closure(re.match(r"[A-Za-z0-9_.-]+", req).group(0), seen)
    return seen
torch_own = closure("torch", set())  # what torch imports lazily (sympy, ...) comes with torch
dists = md.packages_distributions()
new = {{m for m in new if not any(re.sub(r"[-_.]+", "-", d).lower() in torch_own for d in dists.get(m, []))}}
print(sorted(hubconf.dependencies), sorted(new))
assert new <= set(hubconf.dependencies), sorted(new - set(hubconf.dependencies))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


# ----------------------------------------------------------------------------- the model card


def write_run_with_reports(root: Path) -> Path:
    """Our run folder whose config names local folders, with the demo's probe.json and an ijepa-eval report."""
    run_dir = write_our_run(root / "private" / "run", depth=2)
    ckpt_path = run_dir / "checkpoints" / "ckpt-00000010.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["config"]["data"]["root"] = str(root / "private" / "fashion-mnist")
    ckpt["config"]["run"]["out_dir"] = str(root / "private")
    torch.save(ckpt, ckpt_path)
    probe = {
        "train_images": 200,
        "test_images": 100,
        "top1_percent": {"I-JEPA (pretrained)": {"linear_probe": 81.25, "knn": 77.5}},
        "rankme": {"I-JEPA (pretrained)": 41.5},
    }
    (run_dir / "probe.json").write_text(json.dumps(probe))
    report = {
        "checkpoint": str(ckpt_path),
        "weights": "target",
        "features": "avgpool",
        "img_size": 28,
        "data": {"root": str(root / "private" / "fashion-mnist"), "dataset": "idx", "n_train": 200, "n_test": 100},
        "results": [{"train_labels": "all", "n_train": 200, "head": "kNN", "pooling": "avgpool", "top1": 0.6875}],
    }
    (run_dir / "eval-latest.json").write_text(json.dumps(report))
    return run_dir


@pytest.mark.parametrize("which", ["target", "context"])
def test_the_model_card_names_the_encoder_the_config_and_the_reports_and_no_local_path(tmp_path, capsys, which):
    run_dir = write_run_with_reports(tmp_path)
    out = tmp_path / "export"
    assert export_cli.export_main([str(run_dir), "--hf", str(out), "--which", which]) == 0
    capsys.readouterr()
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: mit\n")
    assert f"# I-JEPA vit_tiny/7 (2 blocks) {which} encoder" in card
    assert f"This folder holds the **{which} encoder**" in card
    other = {"target": "context", "context": "target"}[which]
    assert f"**{other} encoder**" not in card
    assert "192, 2 blocks, 3 heads" in card and "trained at 28 px (4x4 = 16 tokens)" in card
    config = yaml_block(card)
    assert config["model"]["patch_size"] == 7 and config["model"]["pred_emb_dim"] == 48
    assert config["data"]["crop_size"] == 28 and config["data"]["root"] == "<local>/fashion-mnist"
    assert "| I-JEPA (pretrained) | 81.2 | 77.5 | 41.50 |" in card  # probe.json
    assert "| all | 200 | kNN | 68.75 |" in card and "ijepa-eval of `ckpt-00000010.pt`" in card
    assert "IJepaModel.from_pretrained" in card and "torch.hub.load" in card and '"ijepa_encoder"' in card
    for f in out.rglob("*"):  # nothing in the export names a local folder
        assert str(tmp_path).encode() not in f.read_bytes(), f.name


def yaml_block(card: str) -> dict:
    import yaml

    return yaml.safe_load(card.split("```yaml\n", 1)[1].split("```", 1)[0])


def test_the_card_of_the_authors_weights_keeps_their_license_and_says_no_config_was_recorded(sources, tmp_path, capsys):
    out = tmp_path / "export"
    assert export_cli.export_main([str(sources["authors"]), "--hf", str(out)]) == 0
    capsys.readouterr()
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: cc-by-nc-4.0\n") and "CC BY-NC 4.0" in card
    assert "records no training config" in card and "No evaluation report" in card
    assert "**target encoder**" in card and "`IN1K-vit.t.16-64px.pth.tar`" in card
    assert '"ijepa_vitt16"' in card  # the hub entry that loads it
