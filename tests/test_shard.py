"""``ijepa-shard``: image folder or file list -> webdataset shards with DALI index files; round trip,
shuffle, bad images, resume after an interruption, the index format, and both loaders reading it."""

from __future__ import annotations

import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import ijepa_fast.data.shard as shard
from ijepa_fast.cli.shard import main
from ijepa_fast.config import DataConfig
from ijepa_fast.data.folder import load_rgb
from ijepa_fast.data.loader import build_pretrain_loader
from ijepa_fast.data.shard import ShardError, list_folder, read_file_list, write_shards
from ijepa_fast.data.synthetic import encode, synthetic_photo
from ijepa_fast.runtime import optional

needs_dali = pytest.mark.skipif(not optional.available("dali"), reason="nvidia-dali is not installed")
MASKS = dict(num_pred_masks=4, min_keep=2)
CLASSES = ("ant", "bee", "cat")


def make_source(root: Path, n: int = 13) -> dict[str, tuple[bytes, int]]:
    """n good images (JPEG and PNG) in three class folders and one bad file; {relative path: (bytes,
    label)} of the good ones."""
    good = {}
    for i in range(n):
        label = i % 3
        fmt, ext = ("PNG", "png") if i % 5 == 4 else ("JPEG", "jpg")
        data = encode(synthetic_photo(36 + i, 30, i), fmt)
        rel = f"{CLASSES[label]}/img{i:02d}.{ext}"
        (root / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        good[rel] = (data, label)
    (root / "bee" / "broken.jpg").write_bytes(encode(synthetic_photo(40, 30, 99), "JPEG")[:200])
    return good


def read_shards(out: Path) -> list[tuple[str, bytes, int, str]]:
    """(key, image bytes, label, source path) of every sample, in shard order, with tarfile."""
    samples = []
    for tar_path in sorted(out.glob("*.tar")):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(tar_path) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        for key, parts in members.items():
            image = next(v for k, v in parts.items() if k in ("jpg", "png"))
            samples.append((key, image, int(parts["cls"]), parts["path"].decode()))
    return samples


def test_round_trip_shuffle_and_bad_images(tmp_path, capsys):
    good = make_source(tmp_path / "src")
    assert main([str(tmp_path / "src"), str(tmp_path / "a"), "--shard-size", "5", "--workers", "2"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("ijepa-shard: 13 images in 3 shards") and "1 bad image(s) left out" in line
    assert "broken.jpg" in line
    samples = read_shards(tmp_path / "a")
    assert sorted(p for *_, p in samples) == sorted(good)  # every good image once, the bad one out
    for _, image, label, path in samples:
        assert (image, label) == good[path]  # bytes and label unchanged
    assert [s[0] for s in samples] == sorted(s[0] for s in samples)
    assert (tmp_path / "a" / "classes.txt").read_text().split() == list(CLASSES)
    paths = [p for *_, p in samples]
    assert paths != sorted(paths)  # shuffled across shards, not class by class
    # the same seed gives the same bytes (serially too); another seed another order
    write_shards(list_folder(tmp_path / "src"), tmp_path / "b", shard_size=5, workers=1)
    for t in sorted((tmp_path / "a").glob("*.[ti][ad][rx]")):
        assert t.read_bytes() == (tmp_path / "b" / t.name).read_bytes()
    write_shards(list_folder(tmp_path / "src"), tmp_path / "c", shard_size=5, seed=1)
    assert [p for *_, p in read_shards(tmp_path / "c")] != paths


@pytest.mark.parametrize("option", ["--workers", "--shard-size"])
@pytest.mark.parametrize("value", ["-2", "0"])
def test_a_count_below_one_is_one_line_naming_the_option(option, value, tmp_path, capsys):
    make_source(tmp_path / "src", n=3)
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "src"), str(tmp_path / "out"), option, value])
    assert exit_.value.code == 2
    assert (
        capsys.readouterr().err.strip().splitlines()[-1]
        == f"ijepa-shard: error: argument {option}: {value}: must be at least 1"
    )
    assert not (tmp_path / "out").exists()


def test_a_file_list_with_labels(tmp_path):
    good = make_source(tmp_path / "src", n=4)
    lines = ["# path label", ""] + [f"{rel} {7 + lab}" for rel, (_, lab) in good.items()]
    (tmp_path / "src" / "list.txt").write_text("\n".join(lines))
    summary = write_shards(read_file_list(tmp_path / "src" / "list.txt"), tmp_path / "out", shard_size=3)
    assert summary.samples == 4 and not summary.bad
    assert {p: lab for _, _, lab, p in read_shards(tmp_path / "out")} == {r: 7 + v[1] for r, v in good.items()}
    (tmp_path / "bad.txt").write_text("a.jpg 1\nb.jpg\n")
    with pytest.raises(ShardError, match=r"bad.txt:2: expected '<image path> <label"):
        read_file_list(tmp_path / "bad.txt")


def test_resume_after_an_interruption_finishes_without_redoing(tmp_path, monkeypatch):
    make_source(tmp_path / "src")
    write_shards(list_folder(tmp_path / "src"), tmp_path / "ref", shard_size=4)
    written, original = [], shard.write_shard

    def dies_on_the_third(out, name, *args):
        if len(written) == 2:
            (out / f".{name}.tar.999.tmp").write_bytes(b"half a shard")  # what a kill leaves
            raise KeyboardInterrupt
        written.append(name)
        return original(out, name, *args)

    monkeypatch.setattr(shard, "write_shard", dies_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        write_shards(list_folder(tmp_path / "src"), tmp_path / "out", shard_size=4)
    assert sorted(p.name for p in (tmp_path / "out").glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    monkeypatch.setattr(shard, "write_shard", lambda out, name, *a: written.append(name) or original(out, name, *a))
    summary = write_shards(list_folder(tmp_path / "src"), tmp_path / "out", shard_size=4)
    assert written == ["shard-000000", "shard-000001", "shard-000002", "shard-000003"]  # nothing twice
    assert (summary.samples, summary.shards, summary.reused, len(summary.bad)) == (13, 4, 2, 1)
    assert not list((tmp_path / "out").glob(".*.tmp"))
    for t in (tmp_path / "ref").iterdir():
        assert t.read_bytes() == (tmp_path / "out" / t.name).read_bytes(), t.name
    with pytest.raises(ShardError, match="other settings"):
        write_shards(list_folder(tmp_path / "src"), tmp_path / "out", shard_size=4, seed=3)


def shard_error_line(capsys) -> str:
    """The command's one error line (after the per-image warnings), with no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("ijepa-shard: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("out_exists", [False, True])
def test_a_source_whose_images_are_all_bad_fails_and_writes_no_shard(tmp_path, capsys, out_exists):
    for i in range(4):
        (tmp_path / "src" / CLASSES[i % 2]).mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / CLASSES[i % 2] / f"{i}.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    if out_exists:
        out.mkdir()
    assert main([str(tmp_path / "src"), str(out), "--workers", "1"]) == 2
    line = shard_error_line(capsys)
    assert line.startswith("ijepa-shard: all 4 images are bad, so no shard was written (first: ")
    assert (list(out.iterdir()) == []) if out_exists else not out.exists()  # a folder made by the user stays


def test_an_out_folder_holding_the_users_files_is_refused(tmp_path, capsys):
    make_source(tmp_path / "src", n=3)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "classes.txt").write_text("my classes")
    assert main([str(tmp_path / "src"), str(tmp_path / "out")]) == 2
    assert shard_error_line(capsys) == (
        f"ijepa-shard: OUT {tmp_path / 'out'} is not empty and is not an earlier ijepa-shard run's folder "
        "(it has no .ijepa-shard.json): write into a new or empty folder"
    )
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["classes.txt"]
    assert (tmp_path / "out" / "classes.txt").read_text() == "my classes"
    with pytest.raises(ShardError, match="is not empty"):  # the library refuses it too
        write_shards(list_folder(tmp_path / "src"), tmp_path / "out")


@pytest.mark.parametrize("out", [".", "bee/shards"])
def test_an_out_inside_the_source_folder_is_refused(tmp_path, capsys, out):
    make_source(tmp_path / "src", n=3)
    before = sorted(p for p in (tmp_path / "src").rglob("*"))
    assert main([str(tmp_path / "src"), str(tmp_path / "src" / out)]) == 2
    assert shard_error_line(capsys) == (
        f"ijepa-shard: OUT {tmp_path / 'src' / out} is inside the source folder {tmp_path / 'src'}: "
        "write the shards outside it"
    )
    assert sorted(p for p in (tmp_path / "src").rglob("*")) == before


@pytest.mark.parametrize("case", ["a file", "a file as parent"])
def test_an_out_that_cannot_be_a_folder_is_one_line_before_listing(tmp_path, capsys, case):
    (tmp_path / "afile").write_text("mine")
    out = tmp_path / "afile" if case == "a file" else tmp_path / "afile" / "shards"
    assert main([str(tmp_path / "no-source"), str(out)]) == 1  # checked before the (missing) source
    expected = (
        f"OUT {out} is a file, not a folder: move it away or choose another OUT"
        if case == "a file"
        else f"OUT {out}: {tmp_path / 'afile'} is a file, not a folder: move that file away or choose another OUT"
    )
    assert shard_error_line(capsys) == f"ijepa-shard: {expected}"
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_full_disk_names_the_shard_and_the_run_resumes(tmp_path, capsys, monkeypatch):
    make_source(tmp_path / "src", n=6)
    original = tarfile.TarFile.addfile

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tarfile.TarFile, "addfile", disk_full)
    out = tmp_path / "out"
    assert main([str(tmp_path / "src"), str(out), "--shard-size", "4", "--workers", "1"]) == 1
    assert shard_error_line(capsys) == (
        f"ijepa-shard: {out / 'shard-000000'}.tar could not be written (No space left on device): "
        "free space on that disk"
    )
    assert sorted(p.name for p in out.iterdir()) == [".ijepa-shard.json", "classes.txt"]  # no partial shard
    monkeypatch.setattr(tarfile.TarFile, "addfile", original)
    assert main([str(tmp_path / "src"), str(out), "--shard-size", "4", "--workers", "1"]) == 0  # resumed
    assert len(read_shards(out)) == 6


def test_index_files_give_each_members_offset_and_size(tmp_path):
    make_source(tmp_path / "src")
    write_shards(list_folder(tmp_path / "src"), tmp_path / "out", shard_size=5)
    for tar_path in sorted((tmp_path / "out").glob("*.tar")):
        lines = tar_path.with_suffix(".idx").read_text().splitlines()
        with tarfile.open(tar_path) as tar:
            members = [m for m in tar if m.isreg()]
        assert lines[0] == f"v1.2 {len(members) // 3}"
        listed = [line.split() for line in lines[1:]]
        flat = [tuple(row[i : i + 4]) for row in listed for i in range(0, len(row), 4)]
        expected = [(m.name.split(".", 1)[1], str(m.offset_data), str(m.size), m.name) for m in members]
        assert flat == expected and all(len(row) == 12 for row in listed)


@needs_dali
def test_dali_reads_the_shards_through_their_index_files(tmp_path):
    from nvidia.dali import fn, pipeline_def

    good = make_source(tmp_path / "src")
    write_shards(list_folder(tmp_path / "src"), tmp_path / "out", shard_size=5)
    tars = sorted(str(p) for p in (tmp_path / "out").glob("*.tar"))

    @pipeline_def(batch_size=13, num_threads=1, device_id=None)
    def read():
        return tuple(
            fn.readers.webdataset(
                paths=tars,
                index_paths=[t[:-4] + ".idx" for t in tars],
                ext=["jpg;png", "cls", "path"],
                missing_component_behavior="error",
            )
        )

    pipe = read()
    pipe.build()
    images, labels, paths = pipe.run()
    seen = {}
    for i in range(13):
        path = bytes(paths.at(i)).decode()
        seen[path] = (bytes(images.at(i)), int(bytes(labels.at(i)).decode()))
    assert seen == good


@needs_dali
def test_the_dali_loader_trains_from_the_shards(tmp_path):
    from ijepa_fast.data.dali import build_dali_loader

    make_source(tmp_path / "src")
    write_shards(list_folder(tmp_path / "src"), tmp_path / "out", shard_size=5)
    cfg = DataConfig(root=str(tmp_path / "out"), split="", crop_size=32, batch_size=4, num_workers=1)
    with build_dali_loader(cfg, grid=4, mask_kwargs=MASKS, seed=0) as loader:
        batches = [b for b, _ in zip(loader, range(3))]
    assert loader.steps_per_epoch == 3 and loader.skipped == 0  # 13 good images, batch 4
    labels = torch.cat([b.labels for b in batches]).tolist()
    assert len(labels) == 12 and set(labels) <= {0, 1, 2}
    assert all(b.images.shape == (4, 3, 32, 32) and torch.isfinite(b.images).all() for b in batches)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@needs_dali
def test_the_dali_loader_decodes_the_shards_on_the_gpu(tmp_path):
    from ijepa_fast.data.dali import build_dali_loader

    make_source(tmp_path / "src")
    write_shards(list_folder(tmp_path / "src"), tmp_path / "out", shard_size=5)
    cfg = DataConfig(root=str(tmp_path / "out"), split="", crop_size=32, batch_size=4, num_workers=1)
    with build_dali_loader(cfg, grid=4, mask_kwargs=MASKS, seed=0, device="cuda") as loader:
        batches = [b for b, _ in zip(loader, range(6))]  # two epochs
    for b in batches:
        assert b.images.is_cuda and b.images.shape == (4, 3, 32, 32) and torch.isfinite(b.images).all()
        assert set(b.labels.tolist()) <= {0, 1, 2}


def test_the_cpu_loader_trains_from_the_shards(tmp_path):
    good = make_source(tmp_path / "src", n=12)
    (tmp_path / "src" / "bee" / "broken.jpg").unlink()
    write_shards(list_folder(tmp_path / "src"), tmp_path / "out", shard_size=5)
    cfg = DataConfig(root=str(tmp_path / "out"), split="", crop_size=32, batch_size=4, num_workers=0, loader="pytorch")
    loader = build_pretrain_loader(cfg, grid=4, mask_kwargs=MASKS, seed=0)
    batches = [b for b, _ in zip(loader, range(3))]  # one epoch: every sample once
    assert Counter(torch.cat([b.labels for b in batches]).tolist()) == Counter(lab for _, lab in good.values())
    assert loader.skipped == 0 and all(b.images.shape == (4, 3, 32, 32) for b in batches)
    # each sample decodes to its own source image (the label read with it is that image's)
    source = loader.dataset.source
    paths = {key: path for key, _, _, path in read_shards(tmp_path / "out")}
    for i in range(len(source)):
        image, label = source[i]
        rel = paths[source.describe(i).rsplit(":", 1)[1]]
        assert np.array_equal(np.asarray(image), np.asarray(load_rgb(tmp_path / "src" / rel)))
        assert label == good[rel][1]
