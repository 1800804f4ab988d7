"""The DALI loader's image check before step 0: header checks, the check split over gloo ranks, and
the per-dataset verdict cache (location, invalidation, concurrent writers). Needs no DALI."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
from pathlib import Path

import pytest

import ijepa_fast.data.dali.validate as validate
from ijepa_fast.config import ConfigError, DataConfig
from ijepa_fast.data.dali.cache import cache_file, cache_home, load_section, merge_section
from ijepa_fast.data.dali.validate import validate_images
from ijepa_fast.data.synthetic import encode, synthetic_photo

BAD = {"cut.jpg", "empty.jpg", "notes.jpg"}


def make_folder(root: Path, n: int = 12) -> list[str]:
    """n good JPEGs in two classes and the three bad files of ``BAD``; sorted absolute paths."""
    for i in range(n):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / f"c{i % 2}" / f"img{i:03d}.jpg").write_bytes(encode(synthetic_photo(40, 32, i), quality=85))
    good = encode(synthetic_photo(40, 32, 99), quality=85)
    (root / "c0" / "cut.jpg").write_bytes(good[: len(good) // 2])
    (root / "c1" / "empty.jpg").write_bytes(b"")
    (root / "c1" / "notes.jpg").write_text("not an image")
    return sorted(str(p) for p in root.rglob("*.jpg"))


def counting(monkeypatch) -> list:
    """Record the paths check_image is called on."""
    calls, original = [], validate.check_image
    monkeypatch.setattr(validate, "check_image", lambda src, mode="full": calls.append(str(src)) or original(src, mode))
    return calls


# ---------------------------------------------------------------------------------------------- location
def test_cache_location_per_dataset_and_overrides(tmp_path):
    env = {"IJEPA_CACHE_DIR": str(tmp_path / "mine"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert cache_home(env) == tmp_path / "mine"
    assert cache_home({"XDG_CACHE_HOME": str(tmp_path / "xdg")}) == tmp_path / "xdg" / "ijepa_fast"
    assert cache_home({}) == Path.home() / ".cache" / "ijepa_fast"
    (tmp_path / "data").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    a, b = cache_file(tmp_path / "data", environ=env), cache_file(tmp_path / "link", environ=env)
    assert a == b and a.parent == tmp_path / "mine" / "image-check" and a.name.startswith("data-")
    assert cache_file(tmp_path / "other", environ=env) != a  # another dataset, another file
    assert cache_file(tmp_path / "data", str(tmp_path / "set"), env).parent == tmp_path / "set" / "image-check"
    assert cache_file(tmp_path / "data", "off", env) is None
    with pytest.raises(ConfigError, match="data.image_check='quick' is invalid"):
        DataConfig(image_check="quick").validate()


# ---------------------------------------------------------------------------------------------- cache
def test_verdicts_are_reused_until_a_file_changes(tmp_path, monkeypatch, caplog):
    paths = make_folder(tmp_path / "data")
    cache = cache_file(tmp_path / "data")
    caplog.set_level(logging.INFO, logger=validate.__name__)
    bad = validate_images(paths, cache=cache, workers=2)
    assert {Path(p).name for p in bad} == BAD
    assert f"{len(paths)} files, 0 verdicts from the cache, {len(paths)} checked" in caplog.text
    calls = counting(monkeypatch)
    caplog.clear()
    assert validate_images(paths, cache=cache) == bad and calls == []
    assert f"{len(paths)} files, {len(paths)} verdicts from the cache, 0 checked" in caplog.text
    # a new size, a new mtime (same size): checked again; a stricter mode re-checks, a weaker one not
    grown, touched = paths[0], paths[1]
    Path(grown).write_bytes(Path(grown).read_bytes() + b"\0")
    st = os.stat(touched)
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    Path(paths[2]).write_bytes(b"broken now")  # the verdict follows the file
    os.utime(paths[2], ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9))
    bad2 = validate_images(paths, cache=cache)
    assert sorted(calls) == sorted([grown, touched, paths[2]]) and paths[2] in bad2
    calls.clear()
    validate_images(paths, mode="full", cache=cache)
    assert sorted(calls) == paths  # header verdicts do not answer a full check
    calls.clear()
    assert validate_images(paths, mode="header", cache=cache) == bad2 and calls == []


def _writer(cache: str, tag: str, n: int) -> None:
    for i in range(n):
        merge_section(cache, "files", {f"/{tag}/{i}": [i, i, "header", ""]})


def _reader(cache: str, stop, torn) -> None:
    while not stop.is_set():
        try:
            json.loads(Path(cache).read_text())
        except FileNotFoundError:
            pass
        except ValueError:
            torn.value += 1


def test_concurrent_writers_lose_nothing_and_readers_never_see_a_torn_file(tmp_path):
    cache = str(tmp_path / "c" / "verdicts.json")
    ctx = mp.get_context("fork")
    stop, torn = ctx.Event(), ctx.Value("i", 0)
    reader = ctx.Process(target=_reader, args=(cache, stop, torn))
    reader.start()
    writers = [ctx.Process(target=_writer, args=(cache, tag, 60)) for tag in ("a", "b")]
    for w in writers:
        w.start()
    for w in writers:
        w.join(60)
    stop.set()
    reader.join(10)
    assert [w.exitcode for w in writers] == [0, 0]
    files = load_section(cache, "files")
    assert sorted(files) == sorted(f"/{t}/{i}" for t in "ab" for i in range(60))  # no update lost
    assert torn.value == 0
    assert not [p for p in Path(cache).parent.iterdir() if p.suffix == ".tmp"]


def test_an_unwritable_cache_costs_a_warning_not_the_check(tmp_path, caplog):
    paths = make_folder(tmp_path / "data", n=2)
    (tmp_path / "ro").write_text("a file where the cache folder should be")
    bad = validate_images(paths, cache=tmp_path / "ro" / "image-check" / "x.json")
    assert {Path(p).name for p in bad} == BAD and "could not write the image-check cache" in caplog.text


# ---------------------------------------------------------------------------------------------- ranks
def _rank(rank: int, world: int, store: str, paths: list[str], cache: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    calls, original = [], validate.check_image
    validate.check_image = lambda src, mode="full": calls.append(str(src)) or original(src, mode)
    first = validate_images(paths, cache=cache, workers=1, group=dist.group.WORLD)
    n_first = len(calls)
    second = validate_images(paths, cache=cache, workers=1, group=dist.group.WORLD)
    Path(out).write_text(json.dumps({"first": first, "second": second, "calls": calls, "n_first": n_first}))
    dist.destroy_process_group()


def test_two_gloo_ranks_split_the_check_and_both_get_every_verdict(tmp_path):
    paths = make_folder(tmp_path / "data")
    cache = str(cache_file(tmp_path / "data"))
    reference = validate_images(paths)  # one process, no cache
    ctx = mp.get_context("fork")
    procs = [
        ctx.Process(target=_rank, args=(r, 2, str(tmp_path / "store"), paths, cache, str(tmp_path / f"r{r}.json")))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    results = [json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2)]
    for res in results:
        assert res["first"] == res["second"] == reference  # every rank knows every bad file
        assert res["n_first"] == len(res["calls"])  # the second pass came from the cache
    checked = [set(res["calls"]) for res in results]
    assert not checked[0] & checked[1] and checked[0] | checked[1] == set(paths)
    assert abs(len(checked[0]) - len(checked[1])) <= 1
    assert set(load_section(cache, "files")) == set(paths)  # both ranks' verdicts in the shared cache


def test_the_header_check_decodes_no_complete_jpeg(tmp_path, monkeypatch):
    """What makes the header check cheap: a JPEG with its end marker is never decoded (the full check
    decodes every one); one without it is, since only a decode can tell."""
    root = tmp_path / "big"
    root.mkdir()
    data = encode(synthetic_photo(64, 48, 0), quality=90)
    paths = []
    for i in range(6):
        paths.append(str(root / f"{i}.jpg"))
        Path(paths[-1]).write_bytes(data if i else data[:-2])  # the first lacks its end marker
    decoded = []
    real_load = validate.load_rgb
    monkeypatch.setattr(validate, "load_rgb", lambda fp: decoded.append(fp) or real_load(fp))
    validate_images(paths, mode="header", workers=1)
    assert decoded == [paths[0]]
    decoded.clear()
    validate_images(paths, mode="full", workers=1)
    assert sorted(decoded) == sorted(paths)
