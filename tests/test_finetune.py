"""The fine-tuner end to end on real data (scikit-learn's digits, shared CIFAR-10): results, exact resume, DDP."""

import json
import os
import re
import socket

import pytest
import safetensors.torch
import timm
import torch
import torch.multiprocessing as mp

import lpconvert
from lpconvert.config import FinetuneConfig
from lpconvert.train.finetune import DIGITS, RunInterrupted, run

FAST = dict(data=DIGITS, batch_size=40, workers=0, quiet=True, lr=0.05, schedule="constant", log_every=5)


def _digits_run(tmp_path, name="run", **overrides):
    values = dict(model="digits_cnn", pretrained=False, K=3, epochs=2, output=str(tmp_path / name),
                  late_phase=("batchnorm", "classifier"), **FAST)
    values.update(overrides)
    return FinetuneConfig(**values)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_finetune_writes_a_complete_run(tmp_path):
    report = run(_digits_run(tmp_path, sigma0=0.1))
    run_dir = tmp_path / "run"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[0]["val_top1"] < 30  # a random start
    assert rows[2]["val_top1"] > 45  # two epochs of real training on the digits
    assert rows[1]["train_loss"] > rows[2]["train_loss"] and rows[1]["K"] == 3
    assert report["start_top1"] == rows[0]["val_top1"]
    best = max(rows, key=lambda r: r["val_top1"])
    assert report["final_top1"] == best["val_top1"] and report["select"] == "best"
    # selected on 120 training digits held out; the 597 test digits measured once, on the exported model
    assert report["validation"] == "held-out" and 45 < report["test_top1"] < 100
    assert (run_dir / "checkpoints" / "last.pt").is_file() and (run_dir / "checkpoints" / "best.pt").is_file()
    assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # the averaged model strict-loads into the original architecture
    state = safetensors.torch.load_file(str(run_dir / "model" / "model.safetensors"))
    fresh = timm.create_model("digits_cnn")
    fresh.load_state_dict(state, strict=True)
    provenance = json.loads((run_dir / "model" / "lpconvert.json").read_text())
    assert provenance["collapsed"] is True and provenance["metrics"]["final"]["top1"] == report["final_top1"]
    # the card says what the file is: architecture, how the members were averaged, the BN statistics; no local path
    card = (run_dir / "model" / "README.md").read_text()
    assert "original `digits_cnn` architecture" in card and "average of K = 3 late-phase members" in card
    assert "running statistics are the members' mean statistics" in card and str(tmp_path) not in card
    assert provenance["averaging"]["bn_stats"] == "fold" and provenance["averaging"]["K"] == 3
    # the late-phase checkpoint keeps all K members
    checkpoint = _load(run_dir / "checkpoints" / "last.pt")
    assert checkpoint["model"]["fc.weight"].shape == (3, 10, 64)
    assert {"kind": "classifier", "modules": ["fc"]} in checkpoint["late_phase"]["targets"]
    assert checkpoint["late_phase"]["K"] == 3 and checkpoint["late_phase"]["sigma0"] == 0.1


def test_interrupted_and_resumed_run_equals_the_uninterrupted_run_bitwise(tmp_path):
    config = dict(epochs=2, sigma0=0.05, nesterov=True, checkpoint_every=2)
    run(_digits_run(tmp_path, "straight", **config))
    with pytest.raises(RunInterrupted):
        run(_digits_run(tmp_path, "resumed", **config), stop_after=7)  # mid-epoch: 9 iterations per epoch
    partial = _load(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert partial["position"]["iteration"] == 7 and partial["position"]["epoch"] == 0
    run(_digits_run(tmp_path, "resumed", resume=str(tmp_path / "resumed"), **config))
    a = _load(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = _load(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]  # noqa: E731
    assert strip(a["history"]["epochs"]) == strip(b["history"]["epochs"])


def test_baseline_k1_and_t0_switch(tmp_path):
    report = run(_digits_run(tmp_path, "plain", K=1))
    assert report["K"] == 1
    assert _load(tmp_path / "plain" / "checkpoints" / "last.pt")["model"]["fc.weight"].shape == (1, 10, 64)
    run(_digits_run(tmp_path, "t0", epochs=3, t0=1))
    rows = [json.loads(line) for line in (tmp_path / "t0" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("K") for r in rows] == [None, 1, 3, 3]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world_size, port, config_dict):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        run(FinetuneConfig(**config_dict))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("mode", ["sequential", pytest.param("vectorized", marks=pytest.mark.slow)])  # 17 s each
def test_two_processes_equal_one_process_on_the_same_global_batch(tmp_path, mode):
    """GroupNorm model (no batch statistics): DDP over 2 gloo processes computes what 1 process computes."""
    common = dict(model="digits_cnn_gn", pretrained=False, K=3, epochs=1, late_phase=("groupnorm", "classifier"),
                  sigma0=0.1, mode=mode, device="cpu", **FAST)
    run(FinetuneConfig(output=str(tmp_path / "one"), **common))
    mp.spawn(_ddp_worker, args=(2, _free_port(), dict(output=str(tmp_path / "two"), **common)), nprocs=2, join=True)
    one = _load(tmp_path / "one" / "checkpoints" / "last.pt")["model"]
    two = _load(tmp_path / "two" / "checkpoints" / "last.pt")["model"]
    moved = 0
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=2e-4, msg=key)  # a lost all-reduce: >1e-3
    torch.manual_seed(0)  # the run's seed: the same random init as the runs above
    start = timm.create_model("digits_cnn_gn")
    lpconvert.convert(start, K=3, targets=("groupnorm", "classifier"), sigma0=0.1, seed=0)
    for key, value in start.state_dict().items():
        moved += not torch.allclose(value, one[key])
    assert moved > 10  # training really changed the weights that were compared


def test_swa_on_top_of_late_phase_training(tmp_path):
    report = run(_digits_run(tmp_path, "swa", epochs=3, swa_start=1, swa_lr=0.02))
    assert report["bn_stats"] == "recalibrate"
    checkpoint = _load(tmp_path / "swa" / "checkpoints" / "last.pt")
    swa = checkpoint["swa"]
    assert swa["n_averaged"].item() == 2  # epochs 2 and 3
    assert not torch.equal(swa["module.fc.weight"], checkpoint["model"]["fc.weight"])  # an average, not the last
    assert [json.loads(line)["lr"] for line in (tmp_path / "swa" / "metrics.jsonl").read_text().splitlines()[1:]] == [
        0.05, 0.02, 0.02]


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    with pytest.raises(lpconvert.LatePhaseError, match="non-finite loss.*nothing was saved"):
        run(_digits_run(tmp_path, "nan", lr=1e12, epochs=2))
    assert not (tmp_path / "nan" / "checkpoints" / "last.pt").exists()


def test_sigint_saves_a_checkpoint_and_exits_130(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    args = [sys.executable, "-m", "lpconvert", "finetune", "digits_cnn", "--no-pretrained", "--data", DIGITS,
            "--K", "2", "--epochs", "200", "--batch-size", "40", "--workers", "0", "--quiet",
            "--output", str(tmp_path / "run")]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    position = _load(tmp_path / "run" / "checkpoints" / "last.pt")["position"]
    assert position["epoch"] >= 1 and position["iteration"] >= 15


def test_bare_resume_on_the_command_line_continues_the_run(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from lpconvert.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(RunInterrupted):
        run(_digits_run(tmp_path, "run", epochs=2), stop_after=12)
    result = CliRunner().invoke(main, ["finetune", "--resume", "run"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]


def test_gradient_accumulation_control(tmp_path):
    """--K 1 --accumulate 3: the member steps on every minibatch, θ once per 3 (paper Table 10's control)."""
    report = run(_digits_run(tmp_path, "accumulate", K=1, accumulate=3, epochs=1))
    checkpoint = _load(tmp_path / "accumulate" / "checkpoints" / "last.pt")
    assert report["K"] == 1 and checkpoint["position"]["iteration"] == 9  # 27 minibatches / 3
    run(_digits_run(tmp_path, "plain", K=1, epochs=1))
    plain = _load(tmp_path / "plain" / "checkpoints" / "last.pt")
    assert plain["position"]["iteration"] == 27  # one θ step per minibatch (1,080 digits: 120 are held out)
    # the member (BN, classifier) and θ moved differently from plain fine-tuning
    for key in ("features.0.0.weight", "fc.weight"):
        assert not torch.allclose(checkpoint["model"][key], plain["model"][key])
    with pytest.raises(lpconvert.LatePhaseError, match="--accumulate"):
        run(_digits_run(tmp_path, "bad", K=3, accumulate=3))


def test_member_settings_start_at_t0_and_a_forced_resume_applies_changed_settings(tmp_path):
    """Before T0 the late-phase weights train as plain weights (U_θ's settings); from T0 on U_φ takes --member-*;
    --resume --force with other settings trains with them (saved optimizer states do not override the config; the
    schedule is constant, so the saved learning rates are the settings')."""
    settings = dict(K=3, epochs=3, t0=1, member_weight_decay=0.5, weight_decay=1e-4, member_lr=0.02)

    def groups(path):
        engine = _load(path / "checkpoints" / "last.pt")["engine"]
        return engine["theta_optimizer"]["param_groups"][0], engine["member_optimizers"][0]["param_groups"][0]

    with pytest.raises(RunInterrupted):
        run(_digits_run(tmp_path, "run", **settings), stop_after=12)  # epoch 0 (30 batches): before T0
    theta, member = groups(tmp_path / "run")
    assert member["weight_decay"] == theta["weight_decay"] == 1e-4 and member["lr"] == theta["lr"] == 0.05
    with pytest.raises(RunInterrupted):
        run(_digits_run(tmp_path, "run", resume=str(tmp_path / "run"), **settings), stop_after=35)  # past T0
    theta, member = groups(tmp_path / "run")
    assert member["weight_decay"] == 0.5 and member["lr"] == 0.02 and theta["weight_decay"] == 1e-4
    changed = dict(settings, member_weight_decay=0.05, lr=0.01)
    run(_digits_run(tmp_path, "run", resume=str(tmp_path / "run"), force=True, **changed))
    theta, member = groups(tmp_path / "run")
    assert member["weight_decay"] == 0.05 and theta["lr"] == 0.01 and member["lr"] == 0.02


def test_the_accumulation_control_starts_at_t0(tmp_path):
    """--K 1 --accumulate 3 --t0 1: plain steps in epoch 1 (27 iterations), accumulation after (9 per epoch)."""
    run(_digits_run(tmp_path, "control", K=1, accumulate=3, t0=1, epochs=2))
    assert _load(tmp_path / "control" / "checkpoints" / "last.pt")["position"]["iteration"] == 27 + 9


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_traces_the_model_once(tmp_path, monkeypatch, resume):
    """The conversion is planned once per run (torch.fx traces of one `plan`); the K = 1 model before T0, the switch
    to K members at T0, the best checkpoint's rebuild and a resume all inject layers by name."""
    import torch.fx

    traces = []
    real = torch.fx.Tracer.trace

    def counted(self, *args, **kwargs):
        traces.append(type(self).__name__)
        return real(self, *args, **kwargs)

    lpconvert.plan(timm.create_model("digits_cnn"), K=3, targets=("batchnorm", "classifier"))
    monkeypatch.setattr(torch.fx.Tracer, "trace", counted)
    lpconvert.plan(timm.create_model("digits_cnn"), K=3, targets=("batchnorm", "classifier"))
    one_plan, traces[:] = len(traces), []
    assert one_plan >= 1
    config = _digits_run(tmp_path, t0=1, epochs=3, K=3)
    if resume:
        with pytest.raises(RunInterrupted):
            run(config, stop_after=40)
        traces.clear()
        config = FinetuneConfig(**{**config.to_dict(), "resume": config.output})
    run(config)
    assert len(traces) == one_plan


def test_a_late_phase_that_may_wreck_the_run_is_warned_about(tmp_path, monkeypatch, caplog):
    """γθ = 1 with K = 4: θ steps on 4 times a plain step from T0 on; a fall of validation top-1 over the first
    late-phase epoch is named too. γθ = 1/K (the default) warns about neither."""
    from lpconvert.train import finetune

    real, scores = finetune.evaluate_averaged, iter([80.0, 60.0, 61.0])

    def scored(*args):
        return {**real(*args), "top1": next(scores)}

    monkeypatch.setattr(finetune, "evaluate_averaged", scored)
    with caplog.at_level("WARNING", logger="lpconvert.train.finetune"):
        run(_digits_run(tmp_path, "risky", K=4, t0=1, epochs=3, gamma_theta=1.0))
    messages = [r.getMessage() for r in caplog.records]
    assert any("4 times a plain step" in m and "--gamma-theta" in m for m in messages), messages
    assert any("fell from 80.00 to 60.00" in m and "--lr" in m for m in messages), messages
    monkeypatch.undo()
    caplog.clear()
    with caplog.at_level("WARNING", logger="lpconvert.train.finetune"):
        run(_digits_run(tmp_path, "default", K=4, t0=1, epochs=2))
    assert not [r for r in caplog.records if "--gamma-theta" in r.getMessage()]


def test_threads_are_capped_recorded_and_sync_bn_needs_a_gpu(tmp_path, monkeypatch):
    """--threads sets torch's thread count for the run and lands in lpconvert.json; without it a process never runs
    more threads than its share of the CPUs; --sync-bn on a CPU is refused before anything is written."""
    from lpconvert.train.runtime import cpu_threads, default_threads

    before = torch.get_num_threads()
    try:
        run(_digits_run(tmp_path, "one", K=1, epochs=1, threads=1))
        provenance = json.loads((tmp_path / "one" / "model" / "lpconvert.json").read_text())
        assert provenance["provenance"]["execution"] == {"device": "cpu", "world_size": 1, "threads": 1,
                                                         "mode": "sequential"}
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr("lpconvert.train.runtime.busy_cpus", lambda: 0.0)  # a quiet machine (the load: test_startup.py)
    torch.set_num_threads(8)
    default_threads.cache_clear()
    try:
        assert (cpu_threads(None, 1), cpu_threads(None, 2), cpu_threads(None, 8), cpu_threads(3, 8)) == (4, 2, 1, 3)
    finally:
        torch.set_num_threads(before)
        default_threads.cache_clear()
    with pytest.raises(lpconvert.LatePhaseError, match="--sync-bn .* no CPU implementation"):
        run(_digits_run(tmp_path, "sync", sync_bn=True, device="cpu"))
    assert not (tmp_path / "sync").exists()


def test_runs_without_output_get_a_new_folder_each(tmp_path, monkeypatch):
    """The default output is a new runs/<date>-<time>-MODEL-K<K> per run: a rerun never collides with the last."""
    monkeypatch.chdir(tmp_path)
    config = dict(model="digits_cnn", pretrained=False, K=1, epochs=1, **FAST)
    first, second = run(FinetuneConfig(**config)), run(FinetuneConfig(**config))
    assert first["run_dir"] != second["run_dir"]
    for report in (first, second):
        path = tmp_path / report["run_dir"]
        assert path.parent == tmp_path / "runs" and re.fullmatch(r"\d{8}-\d{6}-digits_cnn-K1(-\d+)?", path.name)
        assert (path / "model" / "model.safetensors").is_file()


def test_smoothing_changes_the_training_loss_and_legacy_runs_resume_as_they_ran(tmp_path):
    """--smoothing 0.1 trains on the smoothed loss (a higher training loss on the same batches); a run saved without
    a setting added later resumes as that setting's old behaviour (the per-sample data path), not the new default."""
    run(_digits_run(tmp_path, "plain", K=1, epochs=1, select="last"))
    run(_digits_run(tmp_path, "smooth", K=1, epochs=1, select="last", smoothing=0.1))
    loss = [_rows_of(tmp_path / name)[-1]["train_loss"] for name in ("plain", "smooth")]
    assert loss[1] > loss[0] + 0.05, loss

    config = _digits_run(tmp_path, "old", K=1, epochs=2)
    with pytest.raises(RunInterrupted):
        run(config, stop_after=5)
    checkpoint_path = tmp_path / "old" / "checkpoints" / "last.pt"
    state = _load(checkpoint_path)
    del state["config"]["data_in_memory"], state["config"]["smoothing"]  # as an earlier version saved it
    torch.save(state, checkpoint_path)
    with pytest.raises(lpconvert.LatePhaseError, match="different settings \\(data_in_memory\\)"):
        run(_digits_run(tmp_path, "old", K=1, epochs=2, resume=str(tmp_path / "old"), data_in_memory="on"))
    # the refusal released the run's lock: the same process resumes it with the old behaviour
    assert run(_digits_run(tmp_path, "old", K=1, epochs=2, resume=str(tmp_path / "old"), data_in_memory="off"))["K"] == 1


def _rows_of(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_saved_state_is_checked_before_it_is_used(tmp_path):
    """A checkpoint from a newer format, one whose late-phase configuration disagrees with its tensors, and a forced
    resume that would change K after T0 are each refused with one line; before T0 a changed K takes effect."""
    config = _digits_run(tmp_path, "run", K=3, t0=1, epochs=3)
    with pytest.raises(RunInterrupted):
        run(config, stop_after=35)  # past T0: 30 plain iterations, then K = 3
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    good = _load(last)

    def resume_with(state, **changes):
        torch.save(state, last)
        settings = {"K": 3, "t0": 1, "epochs": 3, "resume": str(tmp_path / "run"), **changes}
        return run(_digits_run(tmp_path, "run", **settings))

    with pytest.raises(lpconvert.LatePhaseError, match="format 99, newer than this lpconvert reads"):
        resume_with({**good, "version": 99})
    edited = {**good, "late_phase": {**good["late_phase"], "K": 4}}
    with pytest.raises(lpconvert.LatePhaseError, match="disagree with the saved late-phase configuration .*K = 4"):
        resume_with(edited)
    with pytest.raises(lpconvert.LatePhaseError, match="--K cannot change once the late phase has begun \\(3 → 5"):
        resume_with(good, force=True, K=5)
    report = resume_with(good)
    assert report["K"] == 3 and json.loads((tmp_path / "run" / "config.json").read_text())["K"] == 3

    early = _digits_run(tmp_path, "early", K=3, t0=1, epochs=2)
    with pytest.raises(RunInterrupted):
        run(early, stop_after=5)  # before T0
    report = run(_digits_run(tmp_path, "early", K=4, t0=1, epochs=2, resume=str(tmp_path / "early"), force=True))
    assert report["K"] == 4 and json.loads((tmp_path / "early" / "config.json").read_text())["K"] == 4

