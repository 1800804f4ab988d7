"""The profiling harness (ijepa_fast.bench, through its command line ijepa_fast.cli.bench) end to end
on ViT-tiny on the CPU, the phase-split step against the trainer's step, the GPU-hours and scaling
arithmetic on known numbers."""

from __future__ import annotations

import copy
import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from ijepa_fast import config as config_mod
from ijepa_fast.bench import measure
from ijepa_fast.bench.paper import gpu_hours, peak_bf16_tflops, project
from ijepa_fast.bench.sources import BenchSpec, LoaderBatches, SyntheticBatches
from ijepa_fast.bench.timing import PhaseClock, optimizer_step, percentiles
from ijepa_fast.cli import bench
from ijepa_fast.models.flops import step_flops
from ijepa_fast.train.build import build_train_step
from profiling import scaling
from tests.test_cli import one_error_line

REPO = Path(__file__).resolve().parent.parent
# ViT-tiny on a 4 x 4 grid, batch 2, a 1-block predictor: a few tens of ms per step on a CPU core.
TINY = [
    "model.name=vit_tiny",
    "model.patch_size=8",
    "data.crop_size=32",
    "data.batch_size=2",
    "model.pred_depth=1",
    "model.pred_emb_dim=48",
    "mask.min_keep=4",
    "run.device=cpu",
]
TINY_ARGS = [*TINY, "--warmup", "1", "--steps", "2", "--phase-steps", "1", "--batches", "2"]


def _set(args: list[str], flag: str, value: str) -> list[str]:
    """``args`` with ``flag``'s value replaced."""
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


def test_harness_runs_the_ablation_end_to_end(tmp_path):
    results = tmp_path / "RESULTS.md"
    shutil.copy(REPO / "profiling" / "RESULTS.md", results)
    before = results.read_text()
    out = tmp_path / "out"
    result = bench.run_cli(
        [
            *TINY_ARGS,
            "--ablation",
            "--out",
            str(out),
            "--tag",
            "t",
            "--record",
            str(results),
            "--trace",
            str(tmp_path / "trace.json"),
        ]
    )

    names = [r["name"] for r in result["rows"]]
    assert names[0] == "authors" and names[-1] == "all on (default)"
    assert "all on, compile off" not in names  # left out on a CPU unless --compile-on-cpu
    assert "all on + fused epilogue" not in names  # compiled: likewise
    assert "all on + FP8 target (rowwise)" in names and "all on + FP8 target (tensorwise)" in names  # emulated
    assert len(names) == 13
    for r in result["rows"]:
        assert r["ok"], r
        assert r["images_per_s"] > 0 and math.isfinite(r["loss"])
        assert r["step_ms_p20"] <= r["step_ms_median"] <= r["step_ms_p80"]
        assert r["mfu"] is None and r["peak_mem_gib"] is None  # a CPU has neither
        assert set(r["phases_ms"]) >= {
            "data",
            "target_fwd",
            "context_fwd",
            "predictor_fwd",
            "backward",
            "optimizer",
            "ema",
        }
        # The split step is the same work (test_profiled_step_is_the_trainers_step); how close its sum
        # comes to the plain step is a measurement (RESULTS.md), not a test on a shared CPU.
        assert math.isfinite(r["phases_over_step"]) and r["phases_over_step"] > 0, r
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["authors"]["speedup_vs_authors"] == 1.0
    assert rows["authors"]["attention"] == "math" and rows["all on (default)"]["attention"] == "sdpa"
    assert "sync" in rows["authors"]["phases_ms"] and "sync" not in rows["all on (default)"]["phases_ms"]
    want = step_flops("vit_tiny", 8, 32, rows["authors"]["mean_kc"], rows["authors"]["mean_kt"], 4, 1, 48).total
    assert rows["authors"]["gflop_per_image"] * 1e9 == pytest.approx(want, rel=0.02)  # mean of exact per-batch

    saved = json.loads((out / "t.json").read_text())
    assert [r["name"] for r in saved["rows"]] == names
    assert saved["meta"]["device"].startswith("CPU") and saved["meta"]["commit"]
    for png in ("t_throughput.png", "t_phases.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    assert rows["all on (default)"]["trace"] == str(tmp_path / "trace.json")

    text = results.read_text()
    assert text.startswith(before) and len(text) > len(before)
    added = text[len(before) :]
    assert "| authors |" in added and "commit:" in added and "--ablation" in added and "GPU-hours" in added
    assert (REPO / "profiling" / "RESULTS.md").read_text() != text  # the real file is untouched


def _tiny_spec(*extra: str, **kw) -> BenchSpec:
    return BenchSpec(overrides=[*TINY, *extra], **kw)


@pytest.mark.parametrize("preset, accum", [("authors", 1), ("fast", 1), ("fast", 2)])
def test_profiled_step_is_the_trainers_step(preset, accum):
    """The phase-marked steps (the profiler's) give the same losses and the same student and target
    weights, bit for bit, as the unmarked steps the trainer runs, with accumulation too."""
    spec = _tiny_spec(f"optim.grad_accum={accum}")
    cfg = spec.config_for({"preset": preset})
    torch.manual_seed(0)
    plain = build_train_step(cfg, torch.device("cpu"), steps_per_epoch=100)
    marked = copy.deepcopy(plain)
    source = SyntheticBatches(cfg, torch.device("cpu"), count=3)
    for step in range(2):
        a = optimizer_step(plain, source, step)["loss"]
        clock = PhaseClock(torch.device("cpu"))
        b = optimizer_step(marked, source, step, mark=clock.phase)["loss"]
        clock.stop()
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert plain.stepped and marked.stepped
        phases = clock.durations_ms()
        assert set(phases) >= {"data", "target_fwd", "context_fwd", "predictor_fwd", "backward", "optimizer", "ema"}
        assert clock.names.count("target_fwd") == accum and clock.names.count("optimizer") == 1
    for mod_a, mod_b in ((plain.student, marked.student), (plain.target_encoder, marked.target_encoder)):
        for (name, pa), pb in zip(mod_a.named_parameters(), mod_b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)


def test_accumulation_is_timed_per_optimizer_step(tmp_path):
    """With optim.grad_accum=2 a timed step is two micro-batches: twice the images per step, and the
    phase split sums both micro-batches' phases."""
    result = bench.run_cli([*TINY_ARGS, "optim.grad_accum=2", "--json", str(tmp_path / "r.json")])
    (row,) = result["rows"]
    assert row["ok"], row
    assert row["batch"] == 4 and result["meta"]["spec"]["grad_accum"] == 2
    assert row["phases_total_ms"] == pytest.approx(sum(row["phases_ms"].values())) and row["phases_total_ms"] > 0


def test_harness_with_the_pytorch_loader(tmp_path):
    from ijepa_fast.data.synthetic import write_jpeg_folder

    write_jpeg_folder(tmp_path / "imgs", 8, size=(64, 48))
    args = _set(TINY_ARGS, "--batches", "1")
    result = bench.run_cli(
        [
            *args,
            "--loader",
            "pytorch",
            f"data.root={tmp_path / 'imgs'}",
            "data.num_workers=0",
            f"run.out_dir={tmp_path}",
        ]
    )
    (row,) = result["rows"]
    assert row["ok"], row
    assert result["meta"]["loader"] == "pytorch" and row["data_wait_ms_median"] > 0


def test_console_entry_returns_an_exit_status(tmp_path):
    args = _set(TINY_ARGS, "--steps", "1")
    assert bench.main([*args, "--configs", "authors", "--phase-steps", "0", "--json", str(tmp_path / "r.json")]) == 0
    (row,) = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert row["name"] == "authors" and "phases_ms" not in row
    with pytest.raises(SystemExit):
        bench.main([*args, "--configs", "no such row"])


@pytest.mark.parametrize("native", [True, False])
def test_the_reported_autocast_is_the_trainers_decision(monkeypatch, native):
    """run.dtype=auto: the report's autocast and the trainer's step both follow device.resolve_precision."""
    from ijepa_fast.runtime import device as precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(measure, "run_config", lambda spec, conf, *a, **k: {"name": conf.name, "ok": False})
    meta = bench.run_cli([*TINY_ARGS, "--configs", "authors"])["meta"]
    step = build_train_step(_tiny_spec().config_for({}), torch.device("cpu"), steps_per_epoch=10)
    assert meta["amp"] == ("bf16" if native else "fp32") and meta["amp_reason"].startswith("auto: ")
    assert step.amp_dtype == (torch.bfloat16 if native else None)


def test_real_loader_without_data_is_a_clear_error():
    spec = _tiny_spec(loader="pytorch")
    with pytest.raises(ValueError, match="data.root"):
        LoaderBatches(spec.config_for({"preset": "fast"}), torch.device("cpu"))


def test_peak_table_matches_device_names():
    assert peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_bf16_tflops("NVIDIA H200") == 989.0
    assert peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_bf16_tflops("Tesla V100-SXM2-16GB") is None


def test_gpu_hours_of_the_papers_figure():
    # 300 epochs of 1,281,167 images at 89 images/s per GPU: the paper's "under 1,200 GPU-hours"
    assert gpu_hours(89.0, 300) == pytest.approx(1199.5, abs=0.1)
    assert gpu_hours(178.0, 300) == pytest.approx(1199.5 / 2, abs=0.1)
    with pytest.raises(ValueError):
        gpu_hours(0.0, 300)


def test_projection_measured_and_flop_scaled():
    cfg = config_mod.Config()  # ViT-H/14 at 224 px
    flops = step_flops("vit_huge", 14, 224).total
    rows = [
        {"name": "authors", "ok": True, "images_per_s": 50.0, "gflop_per_image": flops / 1e9},
        {"name": "all on (default)", "ok": True, "images_per_s": 89.0, "gflop_per_image": flops / 1e9},
    ]
    rows = [{**r, "batch": 128} for r in rows]
    h14, h16 = project(rows, cfg, device_name="test GPU")
    assert h14["basis"].startswith("measured (all on")
    assert h14["gpu_hours"] == pytest.approx(1199.5, abs=0.1)
    assert h14["paper_gpu_hours"] == 1200.0 and h14["paper_images_per_s_per_gpu"] == pytest.approx(89.0, abs=0.1)
    assert h16["basis"].startswith("FLOP-scaled") and h16["paper_gpu_hours"] is None
    # 448 px / 16 = 784 patches: about 3x the FLOPs per image, so about 3x the GPU-hours
    assert 2.5 < h16["gpu_hours"] / h14["gpu_hours"] < 3.6
    assert project([{"name": "x", "ok": False}], cfg, "d") == []


def test_percentiles():
    p = percentiles([float(x) for x in range(1, 11)])
    assert p["median"] == 5.5 and p["p20"] == pytest.approx(2.8) and p["p80"] == pytest.approx(8.2)
    assert percentiles([3.0]) == {"median": 3.0, "p20": 3.0, "p80": 3.0}


def test_attention_benchmark_runs_on_cpu(tmp_path):
    from profiling import bench_attention, gpu_summary

    rows = bench_attention.main(
        [
            "--device",
            "cpu",
            "--models",
            "vitb16",
            "--reps",
            "1",
            "--json",
            str(tmp_path / "a.json"),
            "--record",
            str(tmp_path / "R.md"),
        ]
    )
    assert {r["method"] for r in rows} == {"math", "sdpa"} and all(r["ok"] for r in rows)
    assert [r["case"].split(" (")[0] for r in rows[::2]] == ["vitb16 target", "vitb16 context", "vitb16 predictor"]
    assert rows[0]["tokens"] == 196 and rows[0]["head_dim"] == 64 and rows[4]["head_dim"] == 32
    assert "| vitb16 target (N=196) |" in (tmp_path / "R.md").read_text()
    stage = tmp_path / "gpu_check" / "attention"
    stage.mkdir(parents=True)
    (tmp_path / "a.json").rename(stage / "attention.json")
    (stage / "status.tsv").write_text("attention\tok\t1\n")
    assert "vitb16 target: " in gpu_summary.summary(tmp_path / "gpu_check")


def test_every_attention_backend_runs_under_the_autocast_of_its_dtype():
    """bf16 rows run their forward under bf16 autocast, the math row as much as the kernels (so that
    its products run in bf16 as the authors' do); fp32 rows run without autocast."""
    from profiling import bench_attention

    seen = []

    def probe(q, k, v):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), q.dtype))
        return bench_attention.attention_math(q, k, v)

    case = {"case": "c", "seqs": 1, "heads": 2, "tokens": 8, "head_dim": 8}
    for dtype in (torch.bfloat16, torch.float32):
        seen.clear()
        assert bench_attention.measure(case, "probe", probe, "cpu", dtype, reps=1)["ok"]
        assert set(seen) == {(dtype == torch.bfloat16, torch.bfloat16, dtype)}, dtype


def test_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(REPO / "profiling" / "gpu_check.sh")], check=True)


# ----------------------------------------------------------------------------------------- scaling model


def test_ring_cost_on_known_numbers():
    # 2 (n-1)/n * bytes / bw: 2 GPUs, 1 GB at 100 GB/s -> 10 ms; 1 GPU -> nothing
    assert scaling.ring_allreduce_s(1e9, 2, 100e9) == pytest.approx(0.01)
    assert scaling.ring_allreduce_s(1e9, 1, 100e9) == 0.0
    assert scaling.ring_allreduce_s(1e9, 64, 100e9) == pytest.approx(2 * 63 / 64 * 0.01)
    assert scaling.ring_allgather_s(1e9, 4, 100e9) == pytest.approx(0.75 * 0.01)


def test_zero_stage_volumes():
    p = 100e6
    v0, v1, v2, v3 = (scaling.comm_volume_bytes(p, stage, grad_bytes=4, param_bytes=4) for stage in range(4))
    # stage 0: all-reduce of fp32 grads; 1 and 2: reduce-scatter grads + all-gather params (same bytes);
    # stage 3: the params all-gathered in forward and backward instead of after the step: 1.5x stage 0
    assert v0 == {"allreduce": 4 * p}
    assert v1 == v2 == {"reduce_scatter": 4 * p, "allgather": 4 * p}
    assert v3 == {"reduce_scatter": 4 * p, "allgather": 2 * 4 * p}
    # plus the fp32 target encoder's gather for its forward under stage 3 only
    assert scaling.comm_volume_bytes(p, 3, 2, 2, target_params=50e6)["allgather"] == 2 * 2 * p + 4 * 50e6
    assert scaling.comm_volume_bytes(p, 2, 2, 2, target_params=50e6) == {"reduce_scatter": 2 * p, "allgather": 2 * p}
    assert scaling.comm_time_s(v3, 8, 100e9) == pytest.approx(1.5 * scaling.comm_time_s(v0, 8, 100e9))
    assert scaling.comm_time_s(v1, 8, 100e9) == pytest.approx(scaling.comm_time_s(v0, 8, 100e9))


def test_step_time_estimate():
    # 16 GPUs on two nodes of 8, a 600M-parameter model, fp32 gradients and parameters
    cluster = dict(batch=128, params=600e6, gpus_per_node=8, intra_bw=400e9, inter_bw=50e9)
    fp32 = dict(grad_bytes=4, param_bytes=4)
    est = scaling.estimate(step_s=0.5, gpus=16, stage=0, overlap=0.0, **cluster, **fp32)
    comm = 2 * 15 / 16 * 600e6 * 4 / 50e9  # two nodes: the ring runs at the inter-node rate
    assert est["comm_s"] == pytest.approx(comm)
    assert est["step_s"] == pytest.approx(0.5 + comm)
    assert est["images_per_s"] == pytest.approx(16 * 128 / (0.5 + comm))
    hidden = scaling.estimate(step_s=0.5, gpus=16, stage=0, overlap=1.0, **cluster, **fp32)
    assert hidden["step_s"] == pytest.approx(0.5) and hidden["efficiency"] == pytest.approx(1.0)
    one = scaling.estimate(step_s=0.5, gpus=1, stage=3, overlap=0.0, **cluster)
    assert one["comm_s"] == 0.0 and one["step_s"] == 0.5
    # overlap never makes a step shorter than its communication
    slow = scaling.estimate(step_s=0.01, gpus=16, stage=0, overlap=1.0, **cluster, **fp32)
    assert slow["step_s"] == pytest.approx(comm)


def test_scaling_cli_prints_a_table(capsys):
    scaling.main(["--step-ms", "500", "--batch", "128", "--params", "650e6", "--gpus", "1", "8", "64"])
    out = capsys.readouterr().out
    assert "| 64 | 8 |" in out and "stage" in out


# ----------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_harness_on_cuda_phase_split_matches_the_step(tmp_path):
    args = [a.replace("run.device=cpu", "run.device=cuda").replace("batch_size=2", "batch_size=32") for a in TINY_ARGS]
    args = _set(_set(args, "--steps", "10"), "--phase-steps", "5")
    # compile off: the check is the phase split, and compiling takes longer than the rest of this test
    result = bench.run_cli([*args, "--compare-authors", "--set", "speed.compile=off", "--out", str(tmp_path)])
    for r in result["rows"]:
        assert r["ok"], r
        assert r["peak_mem_gib"] > 0
        assert 0.7 < r["phases_over_step"] < 1.4, r


def test_fsdp2_volumes_are_zero3s_with_the_policys_element_sizes():
    """FSDP2 gathers the blocks' parameters in the forward and again in the backward, and the target
    encoder for its forward, as ZeRO-3 does; it sends fp32 gradients and bf16 parameters (its policy
    under bf16 autocast), the target encoder in bf16 too."""
    p, e = 100e6, 50e6
    assert scaling.engine_bytes("fsdp2") == (4, 2)
    v = scaling.comm_volume_bytes(p, "fsdp2", grad_bytes=4, param_bytes=2, target_params=e)
    assert v == {"reduce_scatter": 4 * p, "allgather": 2 * (2 * p + e)}
    zero3 = scaling.comm_volume_bytes(p, 3, grad_bytes=4, param_bytes=4, target_params=e)
    assert zero3["allgather"] - v["allgather"] == 2 * 2 * p + 2 * e  # half the gathered bytes
    rows = scaling.main(["--step-ms", "500", "--params", "650e6", "--gpus", "16", "--stages", "3", "fsdp2"])
    by = {r["stage"]: r for r in rows}
    assert by["fsdp2"]["comm_s"] < by[3]["comm_s"] and by["fsdp2"]["efficiency"] > by[3]["efficiency"]
    with pytest.raises(SystemExit):
        scaling.main(["--step-ms", "500", "--stages", "zero9"])


# ----------------------------------------------------------------------------- bad input: one line


def bench_error_line(capsys) -> str:
    return one_error_line(capsys, "ijepa-bench")


@pytest.fixture
def no_measuring(monkeypatch):
    """Fails a test that gets as far as measuring: the errors under test come before."""

    def measured(*args, **kwargs):
        raise AssertionError("measured before refusing")

    monkeypatch.setattr(bench, "run", measured)
    monkeypatch.setattr(bench, "resolve_device", measured)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "nonexist"], "config error: config file nonexist does not exist"),
        (["--config", "demo", "optim.lr=abc"], "config error: optim.lr='abc' is invalid: expected a number"),
        (["--set", "foo"], "config error: override 'foo' is not of the form section.key=value"),
        (["--model-step", "model.name=vit_nope"], "config error: model.name="),
    ],
)
def test_a_config_error_is_one_line_with_status_2(args, message, capsys, no_measuring):
    assert bench.main(args) == 2
    assert bench_error_line(capsys).startswith(f"ijepa-bench: {message}")


def test_a_missing_data_root_is_one_line_before_measuring(tmp_path, capsys, no_measuring):
    assert bench.main([*TINY_ARGS, "--loader", "pytorch", f"data.root={tmp_path / 'nowhere'}"]) == 1
    assert bench_error_line(capsys) == f"ijepa-bench: data.root={tmp_path / 'nowhere'} does not exist"


@pytest.mark.parametrize(
    "option, case",
    [("--out", "a file"), ("--out", "a file as parent"), ("--record", "a file as parent"), ("--json", "a folder")],
)
def test_an_output_that_cannot_be_written_is_one_line_before_measuring(option, case, tmp_path, capsys, no_measuring):
    (tmp_path / "afile").write_text("mine")
    if case == "a file":
        path, expected = tmp_path / "afile", f"{option} {tmp_path / 'afile'} is a file, not a folder"
    elif case == "a file as parent":
        path = tmp_path / "afile" / "x.md"
        expected = f"{option} {path}: {tmp_path / 'afile'} is a file, not a folder: move that file away"
    else:
        path = tmp_path / "r.json"
        path.mkdir()
        expected = f"{option} {path} is a folder, not a file"
    assert bench.main([*TINY_ARGS, option, str(path)]) == 1
    assert bench_error_line(capsys).startswith(f"ijepa-bench: {expected}")
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_record_that_fails_to_write_leaves_the_results_file_as_it_was(tmp_path, monkeypatch):
    from ijepa_fast.bench import report as report_mod
    from ijepa_fast.io.checkpoint import NotWritableError

    results = tmp_path / "RESULTS.md"
    results.write_text("earlier results\n")

    def disk_full(result):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report_mod, "markdown_report", disk_full)
    with pytest.raises(NotWritableError, match=r"RESULTS.md could not be written \(No space left on device\)"):
        report_mod.record({}, results)
    assert results.read_text() == "earlier results\n" and [p.name for p in tmp_path.iterdir()] == ["RESULTS.md"]
