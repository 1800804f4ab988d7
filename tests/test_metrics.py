"""The collapse monitors against a float64 NumPy reference (LayerNorm, SVD, RankMe's formula) on
matrices with known answers; the meter folding them into its one read; the collapse warning's
crossings; and where they land: metrics.csv (also when resuming an older CSV), TensorBoard and the
loss plot's figure."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch

from ijepa_fast.runtime.optional import available
from ijepa_fast.train import metrics
from ijepa_fast.train.metrics import (
    COLLAPSE_DOC,
    COLLAPSE_RANK_FLOOR,
    COLLAPSE_RANK_FRACTION,
    CollapseWatch,
    DeviceMeter,
    MetricsWriter,
    feature_summary,
    rankme_from_gram,
)

EPS64 = float(np.finfo(np.float64).eps)


def layer_norm_reference(x: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    x = x.astype(np.float64)
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)


def rankme_reference(z: np.ndarray) -> float:
    """Garrido et al. (2023): exp of the entropy of sigma / sum(sigma) + 1e-7, by a float64 SVD;
    over D singular values, as the Gram matrix has (zeros past min(T, D) when T < D)."""
    sigma = np.linalg.svd(z.astype(np.float64), compute_uv=False)
    sigma = np.pad(sigma, (0, z.shape[1] - sigma.size))
    p = sigma / sigma.sum() + 1e-7
    return float(np.exp(-(p * np.log(p)).sum()))


def rankme_rtol(z: np.ndarray, perturbation: float = 0.0) -> float:
    """How far RankMe of z [T, D] may move (relative) when z is perturbed by a matrix of spectral
    norm ``perturbation`` and its singular values are read from a float64 Gram matrix.

    The Gram matrix's eigenvalues are exact to about D * eps64 * sigma_max^2, so their square roots
    to sqrt(D * eps64) * sigma_max; Weyl adds ``perturbation`` to every singular value. Each
    p_k = sigma_k / sum(sigma) + 1e-7 then moves by at most 2 * delta / sum(sigma) summed over k,
    times |log p_k + 1| <= 1 + |log 1e-7| in the entropy, whose change is RankMe's relative change.
    """
    sigma = np.linalg.svd(z.astype(np.float64), compute_uv=False)
    delta = perturbation + np.sqrt(z.shape[1] * EPS64) * sigma[0]
    return 2 * z.shape[1] * delta / sigma.sum() * (1 + abs(np.log(1e-7)))


def summary_of(features: torch.Tensor) -> dict[str, float]:
    s = feature_summary(features)
    return {
        "std": float(s["feature_std"]),
        "std_min": float(s["feature_std_min"]),
        "rankme": float(rankme_from_gram(s["feature_gram"])),
    }


def reference_summary(features: np.ndarray) -> dict[str, float]:
    z = layer_norm_reference(features).reshape(-1, features.shape[-1])  # (T, D)
    std = z.std(axis=0, ddof=1)
    return {"std": std.mean(), "std_min": std.min(), "rankme": rankme_reference(z), "z": z}


def assert_summary_matches_reference(features: torch.Tensor, got: dict[str, float] | None = None) -> dict[str, float]:
    """``got`` (by default ``feature_summary`` of ``features``, float32 or exactly representable in
    it) against the float64 reference, within what float32 normalisation can move it."""
    got = got or summary_of(features)
    want = reference_summary(features.double().numpy())
    dim = features.shape[-1]
    z32 = torch.nn.functional.layer_norm(features.float(), (dim,), eps=1e-5).reshape(-1, dim).double().numpy()
    rounding = np.linalg.norm(z32 - want["z"], ord=2)  # what float32 normalisation perturbs
    assert got["rankme"] == pytest.approx(want["rankme"], rel=rankme_rtol(want["z"], rounding))
    assert got["std"] == pytest.approx(want["std"], rel=1e-5, abs=1e-6)  # float32: a few ulps of a sum
    assert got["std_min"] == pytest.approx(want["std_min"], rel=1e-5, abs=1e-6)
    return got


def test_a_batch_of_identical_tokens_reads_rankme_1_and_std_0():
    g = torch.Generator().manual_seed(0)
    token = torch.randn(64, generator=g)
    scales = torch.rand(6, 11, 1, generator=g) + 0.5  # LayerNorm takes out each token's scale and offset
    features = token * scales + 3.0 * torch.rand(6, 11, 1, generator=g)  # (B=6, N=11, D=64)
    got = assert_summary_matches_reference(features)
    assert got["rankme"] == pytest.approx(1.0, abs=1e-3)  # eps = 1e-7 on 63 zero directions adds ~1e-4
    assert got["std"] < 1e-3 and got["std_min"] < 1e-3


def test_isotropic_gaussian_tokens_read_close_to_full_rank():
    features = torch.randn(32, 128, 64, generator=torch.Generator().manual_seed(1))  # 4096 tokens of 64 dims
    got = assert_summary_matches_reference(features)
    # LayerNorm puts every token orthogonal to (1, ..., 1): at most 63 directions. With 64 tokens per
    # dimension the singular values spread by about +-1/8 (Marchenko-Pastur), which costs little entropy.
    assert 0.98 * 63 < got["rankme"] <= 63
    assert got["std"] == pytest.approx(1.0, abs=0.02)


def test_awkward_shapes_and_anisotropic_features_match_the_reference():
    g = torch.Generator().manual_seed(2)
    basis = torch.randn(45, 45, generator=g)
    spectrum = torch.logspace(0, -4, 45)  # singular values over four decades
    features = (torch.randn(3, 7, 45, generator=g) * spectrum) @ basis + torch.randn(45, generator=g)
    assert_summary_matches_reference(features)


@pytest.mark.parametrize("k", [1, 3, 17])
def test_rankme_of_k_equal_orthogonal_directions_is_k(k):
    g = torch.Generator().manual_seed(k)
    u, _ = torch.linalg.qr(torch.randn(200, k, dtype=torch.float64, generator=g))  # (T, k) orthonormal columns
    v, _ = torch.linalg.qr(torch.randn(40, k, dtype=torch.float64, generator=g))  # (D, k)
    z = 3.0 * u @ v.T  # (T, D): k singular values, all 3
    rank = float(rankme_from_gram(z.T @ z))
    assert rank == pytest.approx(rankme_reference(z.numpy()), rel=rankme_rtol(z.numpy()))
    assert rank == pytest.approx(k, rel=1e-3)  # eps = 1e-7 on the 40 - k zero directions


def test_a_non_finite_gram_matrix_reads_nan_instead_of_failing():
    gram = torch.eye(8, dtype=torch.float64)
    gram[2, 3] = float("nan")
    assert math.isnan(float(rankme_from_gram(gram)))


def test_the_summary_is_float64_under_bf16_autocast():
    features = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(3)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = feature_summary(features)
    assert {v.dtype for v in s.values()} == {torch.float64}
    assert_summary_matches_reference(features.float())


# ----------------------------------------------------------------------------- the meter's one read


class CountReads:
    """Counts Tensor.tolist / item calls (the meter's host reads) while active."""

    def __init__(self, monkeypatch):
        self.count = 0
        for name in ("tolist", "item"):
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self.count += 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


def test_the_meter_reads_loss_and_monitors_in_one_read_and_forgets_them_after(monkeypatch):
    meter = DeviceMeter(torch.device("cpu"))
    features = torch.randn(4, 16, 24, generator=torch.Generator().manual_seed(4))
    meter.update({"loss": torch.tensor(0.5)}, 0)
    meter.update({"loss": torch.tensor(1.5), **feature_summary(features)}, 1)
    reads = CountReads(monkeypatch)
    reading = meter.read()
    assert reads.count == 1
    assert reading.loss == pytest.approx(1.0) and reading.first_bad_step == -1
    want = reference_summary(features.double().numpy())
    assert reading.monitors["rankme"] == pytest.approx(want["rankme"], rel=1e-6)
    assert reading.monitors["feature_std"] == pytest.approx(want["std"], rel=1e-5)
    assert reading.monitors["feature_std_min"] == pytest.approx(want["std_min"], rel=1e-5)
    meter.update({"loss": torch.tensor(2.0)}, 2)  # a window that measured nothing writes no monitors
    assert meter.read().monitors == {}


# ----------------------------------------------------------------------------- the warning


def readings(*ranks: float) -> list[dict[str, float]]:
    return [{"rankme": r, "feature_std": 0.5, "feature_std_min": 0.1} for r in ranks]


def messages(watch: CollapseWatch, ranks: list[float]) -> list[tuple[int, str]]:
    out = []
    for step, reading in enumerate(readings(*ranks), start=1):
        message = watch.check(step, reading)
        if message:
            out.append((step, message))
    return out


def test_the_warning_comes_once_per_fall_below_a_fraction_of_the_first_rank():
    first = 40.0
    low = COLLAPSE_RANK_FRACTION * first * 0.9
    said = messages(CollapseWatch(), [first, 30.0, low, low, math.nan, low, first, low])
    assert [step for step, _ in said] == [3, 7, 8]  # fall, recovery, second fall; silent while below
    assert "collapsing at step 3" in said[0][1] and f"{low:.2f}" in said[0][1]
    assert "back above" in said[1][1] and "collapsing at step 8" in said[2][1]


def test_a_run_that_starts_collapsed_is_flagged_by_the_floor():
    said = messages(CollapseWatch(), [1.0, 1.0])
    assert [step for step, _ in said] == [1]
    assert f"{COLLAPSE_RANK_FLOOR:.2f}" in said[0][1]


def test_windows_without_monitors_neither_set_the_threshold_nor_warn():
    watch = CollapseWatch()
    assert watch.check(1, {}) is None and watch.threshold is None
    assert watch.check(2, readings(20.0)[0]) is None and watch.threshold == max(20 * COLLAPSE_RANK_FRACTION, 2)


# ----------------------------------------------------------------------------- where they land


def row(step: int, **monitors) -> dict:
    return {"step": step, "epoch": 0, "loss": 1.0 / step, "lr": 1e-3, "elapsed_s": float(step), **monitors}


def test_metrics_csv_has_the_monitor_columns_and_leaves_them_empty_when_not_measured(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.write(row(1, feature_std=0.5, feature_std_min=0.25, rankme=12.5))
    writer.write(row(2))
    writer.close()
    rows = metrics.read_metrics(tmp_path / "metrics.csv")
    assert [(r["feature_std"], r["feature_std_min"], r["rankme"]) for r in rows] == [
        ("0.5", "0.25", "12.5"),
        ("", "", ""),
    ]


def test_a_resumed_run_keeps_the_rows_of_its_older_csv_without_monitor_columns(tmp_path):
    old_fields = ["step", "epoch", "loss", "lr", "wd", "momentum", "images_per_s", "skipped", "elapsed_s"]
    with open(tmp_path / "metrics.csv", "w", newline="") as fh:
        fh.write(",".join(old_fields) + "\n")
        for step in (1, 2, 3):
            fh.write(f"{step},0,0.{step},0.001,0.04,0.996,10.0,0,{step}.5\n")
        fh.write("4,0,0.4,0.0")  # cut short by a kill
    writer = MetricsWriter(tmp_path, tensorboard=False, start_step=2)
    writer.write(row(3, feature_std=0.5, feature_std_min=0.25, rankme=12.5))
    writer.close()
    rows = metrics.read_metrics(tmp_path / "metrics.csv")
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["loss"] == "0.1" and rows[0]["rankme"] == "" and rows[2]["rankme"] == "12.5"


@pytest.mark.skipif(not available("tensorboard"), reason="tensorboard is not installed")
def test_tensorboard_gets_the_monitors(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    writer = MetricsWriter(tmp_path, tensorboard=True)
    writer.write(row(1, feature_std=0.5, feature_std_min=0.25, rankme=12.5))
    writer.write(row(2))
    writer.write(row(3, feature_std=0.4, feature_std_min=0.2, rankme=9.0))
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    for tag, want in (("rankme", [12.5, 9.0]), ("feature_std", [0.5, 0.4]), ("feature_std_min", [0.25, 0.2])):
        scalars = events.Scalars(f"train/{tag}")
        assert [s.step for s in scalars] == [1, 3]
        assert [s.value for s in scalars] == pytest.approx(want)


@pytest.mark.skipif(not available("matplotlib"), reason="matplotlib is not installed")
def test_the_loss_figure_has_a_panel_with_rankme_and_std(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.write(row(1, feature_std=0.5, feature_std_min=0.25, rankme=12.5))
    writer.write(row(2))
    writer.write(row(3, feature_std=0.4, feature_std_min=0.2, rankme=9.0))
    writer.close()
    saved = {}
    savefig = Figure.savefig

    def keep(fig, *args, **kwargs):
        saved["lines"] = {line.get_label(): list(line.get_ydata()) for ax in fig.axes for line in ax.get_lines()}
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    assert metrics.plot_loss(tmp_path / "metrics.csv", tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert saved["lines"]["RankMe"] == [12.5, 9.0]
    assert saved["lines"]["mean std"] == [0.5, 0.4] and saved["lines"]["min std"] == [0.25, 0.2]


def test_a_row_whose_step_is_not_a_number_is_named_by_file_and_line_and_the_csv_is_left_as_it_was(tmp_path):
    path = tmp_path / "metrics.csv"
    blanks = [""] * (len(metrics.CSV_FIELDS) - 9)  # every column present: a complete (not torn) row
    path.write_text(
        ",".join(metrics.CSV_FIELDS) + "\n"
        + ",".join(["1", "0", "0.5", "0.001", "0.04", "0.996", "10.0", "0", "1.5", *blanks]) + "\n"
        + ",".join(["two", "0", "0.4", "0.001", "0.04", "0.996", "10.0", "0", "2.5", *blanks]) + "\n"
    )  # fmt: skip
    before = path.read_bytes()
    with pytest.raises(ValueError, match=rf"^{path}, line 3: step 'two' is not a whole number"):
        MetricsWriter(tmp_path, tensorboard=False, start_step=1)
    assert path.read_bytes() == before


def test_pretrain_resuming_over_a_hand_edited_metrics_csv_fails_in_one_line(tmp_path, capsys):
    from ijepa_fast.cli import pretrain
    from tests.test_trainer import tiny_overrides, write_idx

    args = tiny_overrides(write_idx(tmp_path / "data", n=24), tmp_path / "runs", "r")  # 3 steps
    assert pretrain.main(args) == 0
    csv_path = tmp_path / "runs" / "r" / "metrics.csv"
    lines = csv_path.read_text().splitlines()
    lines[2] = "x" + lines[2]  # the second row's step: "x2"
    csv_path.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert pretrain.main([*args, "--resume"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"{csv_path}, line 3: step 'x2' is not a whole number" in err


# ----------------------------------------------------------------------------- Weights & Biases


def test_wandb_on_without_wandb_installed_is_one_line_saying_what_to_install(tmp_path, capsys, no_wandb):
    from ijepa_fast.cli import pretrain
    from tests.test_trainer import tiny_overrides, write_idx

    args = tiny_overrides(write_idx(tmp_path / "data", n=16), tmp_path / "runs", "w", **{"run.wandb": "on"})
    assert pretrain.main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "run.wandb=on needs the optional package 'wandb'" in err and "pip install 'ijepa_fast[wandb]'" in err
    assert "run.wandb=off" in err
    assert not (tmp_path / "runs" / "w" / "checkpoints").exists()


@pytest.fixture
def refused_port():
    """A local port that refuses connections (bound, never listening) while the test runs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def fresh_wandb():
    """W&B reads its WANDB_* settings once per process: set them up afresh for this test, and after it."""
    import wandb

    wandb.teardown()
    yield
    wandb.teardown()


@pytest.mark.skipif(not available("wandb"), reason="wandb is not installed")
@pytest.mark.parametrize("case", ["no API key", "no server"])
def test_wandb_online_that_cannot_start_falls_back_to_offline_and_says_what_to_do(
    case, tmp_path, monkeypatch, caplog, refused_port, request
):
    """Real W&B, kept on this machine: its server is a local port that refuses connections."""
    from ijepa_fast import config as config_mod
    from ijepa_fast.train.trainer import Trainer
    from tests.test_trainer import tiny_overrides, write_idx

    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc, no W&B settings file
    monkeypatch.setenv("WANDB_SILENT", "true")  # never prompt for a key
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{refused_port}")
    if case == "no server":
        monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
        monkeypatch.setenv("WANDB_INIT_TIMEOUT", "2")
    data = write_idx(tmp_path / "data", n=24)  # 3 steps
    cfg = config_mod.load(None, tiny_overrides(data, tmp_path / "runs", "o", **{"run.wandb": "online"}))
    request.getfixturevalue("fresh_wandb")  # after the environment is set
    with caplog.at_level("WARNING"):
        result = Trainer(cfg).fit()
    assert result.steps == 3
    run_dir = tmp_path / "runs" / "o"
    (warning,) = [r.getMessage() for r in caplog.records if "W&B online" in r.getMessage()]
    assert "wandb login" in warning and f"wandb sync {run_dir / 'wandb'}" in warning
    assert ("No API key" if case == "no API key" else "127.0.0.1") in warning
    run_id = (run_dir / metrics.WANDB_ID_FILE).read_text().strip()
    assert list((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))


def test_the_collapse_warning_links_the_page_on_collapse_and_the_page_shows_committed_plots():
    import re
    from pathlib import Path

    said = messages(CollapseWatch(), [40.0, 1.0])
    assert len(said) == 1 and COLLAPSE_DOC in said[0][1]
    page = Path(__file__).resolve().parent.parent / COLLAPSE_DOC
    text = page.read_text()
    assert "RankMe" in text and "feature_std_min" in text
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(images) >= 2
    for image in images:  # small PNGs beside the page
        path = page.parent / image
        assert path.suffix == ".png" and path.is_file() and path.stat().st_size < 120_000, image
