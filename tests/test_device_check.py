"""scripts/device_check.py --tiny on the CPU: every section is written with sane figures, so the GPU check cannot rot.

Nothing here is about speed (machines are shared and noisy): only that the figures exist, are consistent with each
other, and that the exactness, recompilation and budget machinery work.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from script_module import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "device_check.py"


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check") / "x.json"
    proc = _run(out)
    return json.loads(out.read_text()), proc.stdout


@pytest.fixture(scope="module")
def device_check():
    return load_script("device_check")


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_every_section_is_written(tiny):
    data, stdout = tiny
    assert data["complete"] is True
    assert data["errors"] == [] and data["skipped"] == []
    for key in ("environment", "settings", "targets", "throughput", "vectorized_32px", "peak_memory", "compile",
                "exactness", "checks", "elapsed_s"):
        assert key in data, key
    env = data["environment"]
    assert env["torch"] == torch.__version__ and env["timm"] == timm.__version__
    assert env["device"] == "cpu" and env["cuda"] is None and env["cpu_threads"] == 1
    assert env["git_commit"] is None or len(env["git_commit"]) == 40
    assert data["settings"]["tiny"] is True and data["settings"]["amp"] == "off"
    assert "wrote" in stdout and "| model |" in stdout


def test_throughput_ratios_are_measured_in_the_same_run(tiny):
    data, _ = tiny
    models = data["settings"]["models"]
    assert list(data["throughput"]) == models
    for name in models:
        result = data["throughput"][name]
        modes = result["modes"]
        assert set(modes) == {"plain", "sequential", "vectorized"}  # 32 px: --mode auto would vectorize
        for mode in modes.values():
            assert _positive(mode["img_s"])
            assert len(mode["img_s_rounds"]) == result["rounds"] == 2
            assert all(_positive(r) for r in mode["img_s_rounds"])
            assert mode["peak_gib"] is None  # no GPU memory on a CPU
        for mode in ("sequential", "vectorized"):
            ratio = result["late_phase_over_plain"][mode]
            assert _positive(ratio)
            assert ratio == pytest.approx(modes[mode]["img_s"] / modes["plain"]["img_s"])
            assert result["peak_memory_over_plain"][mode] is None
        assert data["peak_memory"][name] is None


def test_vectorized_32px(tiny):
    data, _ = tiny
    vec = data["vectorized_32px"]
    assert vec["size"] == 32 and vec["K"] == data["settings"]["K"]
    assert set(vec["modes"]) == {"plain", "sequential", "vectorized", "plain-stacked"}
    for key in ("vectorized_over_sequential", "vectorized_over_plain", "vectorized_over_plain_stacked"):
        assert _positive(vec[key]), key
    modes = vec["modes"]
    ratio = modes["vectorized"]["img_s"] / modes["sequential"]["img_s"]
    assert vec["vectorized_over_sequential"] == pytest.approx(ratio)


def test_vectorized_equals_sequential_in_float32(tiny):
    data, _ = tiny
    exact = data["exactness"]
    assert exact["dtype"] == "float32" and exact["tensors_compared"] > 50
    assert 0 <= exact["max_abs_diff"] < 1e-5 and exact["passed"] is True
    assert exact["loss_max_abs_diff"] < 1e-5
    assert exact["max_abs_update"] > 1e-3  # the members really trained: the comparison is not vacuous
    assert exact["worst_tensor"]


def test_compile_section(tiny):
    data, _ = tiny
    c = data["compile"]
    assert type(c["recompiles"]) is int and c["recompiles"] >= 0
    assert type(c["graph_breaks"]) is int and c["graph_breaks"] >= 0
    assert type(c["frames_compiled"]) is int and c["frames_compiled"] >= 1
    assert _positive(c["eager_step_s"])
    assert len(c["recompile_reasons"]) == min(c["recompiles"], 3)
    if c["stopped"] is None:  # no recompilation: the compiled step was timed
        assert c["recompiles"] == 0 and c["recompiles_after_warmup"] == 0
        assert _positive(c["step_s"]) and _positive(c["first_step_s"]) and _positive(c["compiled_over_eager"])
    else:
        assert c["recompiles"] >= 1 and c["step_s"] is None


def test_checks_follow_the_figures(tiny):
    data, _ = tiny
    checks = {c["check"]: c for c in data["checks"]}
    assert all(c["passed"] in (True, False) for c in checks.values())  # every figure was measured
    name = data["settings"]["models"][0]
    seq = checks[f"{name} late-phase sequential / plain img/s"]
    assert seq["value"] == data["throughput"][name]["late_phase_over_plain"]["sequential"]
    assert seq["passed"] == (seq["value"] >= data["targets"]["late_phase_over_plain_min"])
    recompiles = checks["compile: recompilations (fixed shapes, K members)"]
    assert recompiles["passed"] == (data["compile"]["recompiles"] == 0)
    assert checks["vectorized vs sequential max abs diff (float32)"]["passed"] is True
    assert not any("peak memory" in c for c in checks)  # no memory figure on a CPU


def test_the_time_budget_skips_and_still_writes(tmp_path, device_check):
    out = tmp_path / "x.json"
    threads = torch.get_num_threads()
    try:
        assert device_check.main(["--tiny", "--budget-s", "0", "--out", str(out)]) == 0  # in-process: no import
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    assert data["complete"] is True and data["errors"] == []
    skipped = {s["part"] for s in data["skipped"]}
    assert {"exactness", "vectorized_32px", "compile", f"throughput/{data['settings']['models'][0]}"} <= skipped
    assert all("time budget" in s["reason"] for s in data["skipped"])
    assert data["throughput"] == {} and "compile" not in data and "exactness" not in data


def test_recompile_counter_counts_a_real_recompilation(device_check):
    """The counter the compile section relies on sees dynamo's recompilations (a new input shape forces one)."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled = torch.compile(torch.nn.Linear(3, 2), backend="eager")
    counter = device_check.RecompileCounter()
    try:
        with counter.installed():
            compiled(torch.randn(2, 3))
            compiled(torch.randn(2, 3))
            assert counter.count == 0
            compiled(torch.randn(5, 3))
        assert counter.count == 1 and "size mismatch" in counter.reasons[0]
    finally:
        torch._dynamo.reset()
