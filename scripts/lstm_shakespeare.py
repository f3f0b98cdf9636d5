"""The LSTM experiment (paper Table 6 analog) on tiny-shakespeare: a character-level LSTM language model trained as
base, base + rank-1 and late-phase rank-1, each evaluated with and without SWA, in bits per character.

    python scripts/lstm_shakespeare.py                                   # the full experiment (3 seeds × 3 arms)
    python scripts/lstm_shakespeare.py --hidden 128 --append             # a smaller model in the same report
    python scripts/lstm_shakespeare.py --tiny --data FILE --out DIR/x    # a seconds-long smoke run

The paper (enwik8, LSTM with 500 units, Adam lr 1e-3, batch 128, 50 epochs, no regularisation): late-phase rank-1
weights from epoch 30 with K = 10, σ0 = 0.35, γθ = 1; SWA from epoch 40. Here the same proportions of the schedule:
T0 after 60 % of the epochs, SWA over the last 20 %; an "epoch" is a fixed number of minibatches (--steps-per-epoch).

Arms (one model per seed; every arm of a seed has the same initial weights and sees the same minibatches):

- ``base``: the plain LSTM language model, Adam;
- ``base + rank-1``: the model converted with K = 1 rank-1 factors on the LSTM's hidden-to-hidden matrix
  (W_hh ∘ u vᵀ, factors set uniformly in [1 − 0.01, 1 + 0.01]), trained all epochs with the engine at K = 1;
- ``late-phase rank-1``: the same run until T0 (it branches off the base + rank-1 run there), then the K = 1 model is
  collapsed (u vᵀ folded into W_hh) and converted again with K members whose factors start at 1 + σ0 ε (Eq. 2 around
  the trained factors, multiplicatively), trained with Algorithm 1 (γθ = 1, a fresh Adam per member, θ's Adam state
  carried across T0 with the W_hh moments rescaled to the folded parametrisation).

Every arm is evaluated as one plain ``nn.LSTM`` model (Eq. 1: ``lpconvert.collapse``) with its final weights and
with its SWA average (the trained model's parameters averaged at the end of every epoch of the last 20 %, then
collapsed); the late-phase arm also as the non-averaged ensemble of its final members (mean of their softmax) and as
its members one by one (mean BPC). Bits per character on the held-out last 10 % of the text (test) and on a fixed
sample of the training text of the same size. Results go to ``--out`` (.md and .json) after every run; ``--append``
keeps the finished (configuration, arm, seed) runs of ``--out``'s JSON and skips them.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import platform
import shlex
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import lpconvert
from lpconvert.compare.stats import paired_difference, summary

SHARED = Path(__file__).resolve().parents[2] / "shared"
ARMS = ("base", "base + rank-1", "late-phase rank-1")
LATE = "late-phase rank-1"
RANK1_OPTIONS = {"rank1": {"input_weights": False}}
#: Paper Table 6 (enwik8, test BPC): (final, SWA).
PAPER = {"base": (1.695, 1.626), "base + rank-1": (1.663, 1.616), LATE: (1.633, 1.615)}
#: Settings that define a configuration (its rows in the report are comparable).
CONFIG_KEYS = ("hidden", "embed", "seq_len", "batch_size", "epochs", "steps_per_epoch", "K", "sigma0", "lr",
               "factor_init", "t0_frac", "swa_frac", "test_frac")
ANALYSIS_MARKER = "<!-- analysis: text below this line is kept when the script rewrites the report -->"


class CharLSTM(nn.Module):
    """Embedding → one-layer LSTM → linear read-out; returns the flattened (batch·time, vocab) logits."""

    def __init__(self, vocab: int, embed: int, hidden: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(x))  # zero initial state: no state carried across sequences
        return self.head(out).reshape(-1, self.vocab)


# -- data -------------------------------------------------------------------------------------------------------------
def load_text(path: str, limit: int | None = None) -> tuple[str, str]:
    raw = Path(path).read_bytes()
    text = raw.decode("utf-8")
    if limit is not None:
        text = text[:limit]
    return text, hashlib.sha256(text.encode("utf-8")).hexdigest()


def encode(text: str) -> tuple[torch.Tensor, list[str]]:
    chars = sorted(set(text))  # the vocabulary of the whole text
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text], dtype=torch.long), chars


def split(ids: torch.Tensor, test_frac: float) -> tuple[torch.Tensor, torch.Tensor]:
    cut = len(ids) - int(round(test_frac * len(ids)))
    return ids[:cut], ids[cut:]


class Batches:
    """Minibatches of ``batch`` sequences of ``seq_len + 1`` characters at uniformly random offsets of the training
    text, from a generator seeded by the run's seed: the i-th minibatch is the same in every arm of a seed."""

    def __init__(self, train: torch.Tensor, seq_len: int, batch: int, seed: int) -> None:
        self.train, self.seq_len, self.batch = train, seq_len, batch
        self.generator = torch.Generator().manual_seed(10_000 + seed)
        self.span = torch.arange(seq_len + 1)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.train) - self.seq_len, (self.batch,), generator=self.generator)
        chunk = self.train[starts[:, None] + self.span]
        return chunk[:, :-1], chunk[:, 1:].reshape(-1)


def test_chunks(ids: torch.Tensor, seq_len: int) -> list[torch.Tensor]:
    """The whole test text in consecutive chunks of seq_len + 1 characters overlapping by one: every character but the
    first is predicted exactly once, each chunk from a zero state. Returns [full chunks (N, L+1), last short chunk]."""
    starts = list(range(0, len(ids) - 1, seq_len))
    full = [s for s in starts if s + seq_len + 1 <= len(ids)]
    parts = [torch.stack([ids[s:s + seq_len + 1] for s in full])]
    if len(full) < len(starts):
        parts.append(ids[starts[-1]:][None])
    return parts


def train_sample(train: torch.Tensor, seq_len: int, chars: int) -> list[torch.Tensor]:
    """A fixed sample of the training text (the same for every seed and arm): ⌈chars / seq_len⌉ chunks of seq_len + 1
    characters at evenly spaced offsets."""
    n = max(1, math.ceil(chars / seq_len))
    starts = torch.linspace(0, len(train) - seq_len - 1, n).long()
    return [train[starts[:, None] + torch.arange(seq_len + 1)]]


def subsample(chunks: list[torch.Tensor], chars: int, seq_len: int) -> list[torch.Tensor]:
    """Every s-th full chunk, about `chars` characters: the per-epoch curves."""
    full = chunks[0]
    stride = max(1, len(full) // max(1, math.ceil(chars / seq_len)))
    return [full[::stride]]


# -- evaluation -------------------------------------------------------------------------------------------------------
@torch.no_grad()
def bpc(model: nn.Module, chunks: list[torch.Tensor], batch: int = 256) -> float:
    """Bits per character: summed cross-entropy (nats) over every predicted character / count / ln 2."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for part in chunks:
        for rows in part.split(batch):
            logits = model(rows[:, :-1])
            total += F.cross_entropy(logits.double(), rows[:, 1:].reshape(-1), reduction="sum").item()
            count += rows[:, 1:].numel()
    model.train(was_training)
    return total / count / math.log(2)


@torch.no_grad()
def member_bpc(model: nn.Module, chunks: list[torch.Tensor], batch: int = 256) -> tuple[float, list[float]]:
    """The non-averaged ensemble (mean of the members' softmax, as ``lpconvert.ensemble_predict``) and every member
    alone, in one pass: (ensemble BPC, [member BPC])."""
    K = lpconvert.num_members(model)
    was_training = model.training
    model.eval()
    ens, members, count = 0.0, [0.0] * K, 0
    try:
        for part in chunks:
            for rows in part.split(batch):
                target = rows[:, 1:].reshape(-1)
                logps = []
                for k in range(K):
                    lpconvert.select_members(model, k)
                    logp = model(rows[:, :-1]).double().log_softmax(-1).gather(1, target[:, None]).squeeze(1)
                    members[k] -= logp.sum().item()
                    logps.append(logp)
                ens -= (torch.logsumexp(torch.stack(logps), 0) - math.log(K)).sum().item()
                count += target.numel()
    finally:
        lpconvert.select_members(model, 0)
        model.train(was_training)
    return ens / count / math.log(2), [m / count / math.log(2) for m in members]


def plain(model: nn.Module) -> nn.Module:
    """The model as one plain CharLSTM (Eq. 1 for a converted model)."""
    return lpconvert.collapse(model) if lpconvert.late_phase_layers(model) else model


class WeightAverage:
    """Running mean of a model's parameters and buffers (``torch.optim.swa_utils.AveragedModel``'s equal average)."""

    def __init__(self) -> None:
        self.n = 0
        self.state: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.n += 1
        for name, value in model.state_dict().items():
            if name not in self.state:
                self.state[name] = value.detach().double().clone()
            else:
                self.state[name] += (value.double() - self.state[name]) / self.n

    def model(self, like: nn.Module) -> nn.Module:
        """A copy of `like` holding the average (then collapsed by :func:`plain`)."""
        averaged = copy.deepcopy(like)
        averaged.load_state_dict({k: v.to(like.state_dict()[k].dtype) for k, v in self.state.items()}, strict=True)
        return averaged


# -- training -----------------------------------------------------------------------------------------------------------
class Run:
    """One arm of one seed: its model, its optimiser(s), its minibatch stream, its SWA average and its curve."""

    def __init__(self, arm: str, model: nn.Module, batches: Batches, cfg: dict) -> None:
        self.arm, self.model, self.batches, self.cfg = arm, model, batches, cfg
        self.swa = WeightAverage()
        self.curve: list[dict] = []
        self.epoch = 0
        self.engine: lpconvert.LatePhaseEngine | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        if lpconvert.late_phase_layers(model):
            self.engine = self.new_engine(model)
        else:
            self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
        self.seconds = 0.0

    def new_engine(self, model: nn.Module) -> lpconvert.LatePhaseEngine:
        """Algorithm 1 with Adam for θ and the members, γθ = 1."""
        return lpconvert.LatePhaseEngine(model, partial(torch.optim.Adam, lr=self.cfg["lr"]), gamma_theta=1.0)

    def train_epoch(self) -> float:
        """S minibatches (K at a time through Algorithm 1 for a converted model); returns their mean loss in bits."""
        started = time.perf_counter()
        self.model.train()
        steps, losses = self.cfg["steps_per_epoch"], []
        K = lpconvert.num_members(self.model) if self.engine else 1
        done = 0
        while done < steps:
            n = min(K, steps - done)
            xs, ys = zip(*(self.batches.next() for _ in range(n)))
            if self.engine:
                losses.extend(self.engine.step(list(xs), list(ys)).tolist())
            else:
                self.optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(self.model(xs[0]), ys[0])
                loss.backward()
                self.optimizer.step()
                losses.append(loss.item())
            done += n
        self.epoch += 1
        if self.epoch > self.cfg["epochs"] - self.cfg["swa_epochs"]:
            self.swa.update(self.model)
        self.seconds += time.perf_counter() - started
        return statistics.fmean(losses) / math.log(2)

    def branch(self) -> "Run":
        """An exact copy (model, optimiser states, minibatch stream position, SWA, curve) for the late-phase arm."""
        other = copy.copy(self)
        other.model = copy.deepcopy(self.model)
        other.batches = copy.copy(self.batches)
        other.batches.generator = torch.Generator().set_state(self.batches.generator.get_state())
        other.swa = copy.deepcopy(self.swa)
        other.curve = copy.deepcopy(self.curve)
        other.engine = self.new_engine(other.model)
        other.engine.load_state_dict(copy.deepcopy(self.engine.state_dict()))
        return other

    def late_phase(self, seed: int) -> dict:
        """T0 through :func:`lpconvert.enter_late_phase`: fold the K = 1 factors into W_hh, convert to K members
        around them (factors 1 + σ0 ε), carry θ's Adam state (W_hh's moments divided by u vᵀ, resp. (u vᵀ)², the
        gradient's factor in the folded parametrisation); the members' Adam states start afresh."""
        layer = lpconvert.late_phase_layers(self.model)["lstm"]
        multipliers = {n: torch.outer(getattr(layer, f"rank1_u_{n}")[0], getattr(layer, f"rank1_v_{n}")[0]).detach()
                       for n in layer.factored}
        names_old = _theta_names(self.model, self.engine)
        members = dataclasses.replace(lpconvert.late_phase_config(self.model), K=self.cfg["K"],
                                      sigma0=self.cfg["sigma0"], seed=seed)

        def folded_theta_state(state: dict) -> dict:
            state = copy.deepcopy(state)
            for i, name in enumerate(names_old):
                short = name.removeprefix("lstm.")
                if name.startswith("lstm.") and short in multipliers and i in state["state"]:
                    m = multipliers[short]
                    state["state"][i]["exp_avg"] /= m
                    state["state"][i]["exp_avg_sq"] /= m * m
            return state

        self.model, self.engine = lpconvert.enter_late_phase(self.model, self.engine, members, self.new_engine,
                                                             carry_member_state=False, theta_state=folded_theta_state)
        if _theta_names(self.model, self.engine) != names_old:
            raise RuntimeError("θ's parameters changed order across T0; cannot carry Adam's state")
        all_m = torch.cat([m.flatten() for m in multipliers.values()])
        return {"K_after_t0": lpconvert.num_members(self.model),
                "uv_at_t0": {"mean": all_m.mean().item(), "std": all_m.std().item(),
                             "min": all_m.min().item(), "max": all_m.max().item()}}


def _theta_names(model: nn.Module, engine: lpconvert.LatePhaseEngine) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for p in engine.theta_params]


def initial_model(cfg: dict, vocab: int, seed: int, rank1: bool) -> nn.Module:
    torch.manual_seed(seed)
    model = CharLSTM(vocab, cfg["embed"], cfg["hidden"])
    if rank1:
        model = lpconvert.convert(model, K=1, targets="rank1", include="lstm", options=RANK1_OPTIONS)
        g = torch.Generator().manual_seed(20_000 + seed)
        with torch.no_grad():
            for layer in lpconvert.late_phase_layers(model).values():
                for p in layer.late_phase_parameters():  # uniform in [1 - a, 1 + a]
                    p.copy_(1 + cfg["factor_init"] * (2 * torch.rand(p.shape, generator=g) - 1))
    return model


def evaluate_run(run: Run, evals: dict, extra: dict) -> list[dict]:
    rows = []
    final, swa = plain(run.model), plain(run.swa.model(run.model))
    for name, model in (("final", final), (f"SWA ({run.swa.n} epochs)", swa)):
        rows.append({"eval": name, "train_bpc": bpc(model, evals["train"]), "test_bpc": bpc(model, evals["test"])})
    if run.arm == LATE:
        K = lpconvert.num_members(run.model)
        ens_test, members_test = member_bpc(run.model, evals["test"])
        ens_train, members_train = member_bpc(run.model, evals["train"])
        rows.append({"eval": f"ensemble of {K} members (final)", "train_bpc": ens_train, "test_bpc": ens_test})
        rows.append({"eval": "members alone (mean)", "train_bpc": statistics.fmean(members_train),
                     "test_bpc": statistics.fmean(members_test), "members_test_bpc": members_test})
        layer = lpconvert.late_phase_layers(run.model)["lstm"]
        outer = torch.stack([torch.einsum("ko,ki->koi", getattr(layer, f"rank1_u_{n}"), getattr(layer, f"rank1_v_{n}"))
                             for n in layer.factored]).detach()
        extra = dict(extra, member_spread=outer.std(dim=1).mean().item())
    for row in rows:
        row.update(arm=run.arm, minutes=run.seconds / 60, epochs=run.epoch, **extra)
    return rows


def curve_point(run: Run, evals: dict, train_loss: float | None) -> None:
    model = plain(run.model)
    run.curve.append({"epoch": run.epoch, "K": lpconvert.num_members(run.model) if run.engine else 1,
                      "train_loss_bpc": train_loss, "train_bpc": bpc(model, evals["train_curve"]),
                      "test_bpc": bpc(model, evals["test_curve"])})


def run_seed(cfg: dict, seed: int, arms: list[str], evals: dict, vocab: int, train: torch.Tensor,
             finish, save_dir: Path | None) -> None:
    """Train the requested arms of one seed; ``finish(arm, run, rows)`` records each as soon as it is done."""
    t0_epoch = cfg["t0_epoch"]

    def complete(run: Run, extra: dict) -> None:
        while run.epoch < cfg["epochs"]:
            loss = run.train_epoch()
            curve_point(run, evals, loss)
            print(f"  {run.arm} seed {seed} epoch {run.epoch}: train loss {loss:.3f}, "
                  f"curve test {run.curve[-1]['test_bpc']:.3f} bpc ({run.seconds / 60:.1f} min)", flush=True)
        rows = evaluate_run(run, evals, extra)
        if save_dir is not None:
            save_models(save_dir, run, seed)
        finish(run, rows)

    if "base" in arms:
        run = Run("base", initial_model(cfg, vocab, seed, rank1=False), Batches(train, cfg["seq_len"],
                                                                                 cfg["batch_size"], seed), cfg)
        curve_point(run, evals, None)
        complete(run, {})
    if "base + rank-1" in arms or LATE in arms:
        run = Run("base + rank-1", initial_model(cfg, vocab, seed, rank1=True),
                  Batches(train, cfg["seq_len"], cfg["batch_size"], seed), cfg)
        curve_point(run, evals, None)
        while run.epoch < t0_epoch:
            loss = run.train_epoch()
            curve_point(run, evals, loss)
        late = None
        if LATE in arms:
            late = run.branch()
            late.arm = LATE
        if "base + rank-1" in arms:
            complete(run, {})
        if late is not None:
            if late.swa.n:
                raise SystemExit("SWA would start before T0 in the late-phase arm; raise --t0-frac or lower --swa-frac")
            info = late.late_phase(seed)
            complete(late, info)


def save_models(save_dir: Path, run: Run, seed: int) -> None:
    save_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{run.arm.replace(' + ', '+').replace(' ', '-')}-s{seed}"
    torch.save(plain(run.model).state_dict(), save_dir / f"{stem}-final.pt")
    torch.save(plain(run.swa.model(run.model)).state_dict(), save_dir / f"{stem}-swa.pt")
    if run.arm == LATE:
        torch.save(run.model.state_dict(), save_dir / f"{stem}-members.pt")


# -- the report -------------------------------------------------------------------------------------------------------
def config_label(cfg: dict) -> str:
    label = f"H{cfg['hidden']}-L{cfg['seq_len']}-B{cfg['batch_size']}-E{cfg['epochs']}x{cfg['steps_per_epoch']}"
    if (cfg["K"], cfg["sigma0"]) != (10, 0.35):  # the paper's late phase; another one is an ablation of its own
        label += f"-K{cfg['K']}-sigma{cfg['sigma0']:g}"
    return label


#: Settings the late phase alone depends on: configurations that differ only in them share the base arms.
LATE_KEYS = ("K", "sigma0")


def same_base(a: dict, b: dict) -> bool:
    return all(a[k] == b[k] for k in a if k not in LATE_KEYS) and set(a) == set(b)


def hardware(threads: int) -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        name = platform.processor() or platform.machine()
    import os

    return f"{name}, {os.cpu_count()} CPUs, torch {torch.__version__} with {threads} thread(s)"


def code_version() -> dict:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"commit": commit, "lpconvert": str(Path(lpconvert.__file__).resolve().parent),
            "script_sha256": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()}


def show(stats: dict | None, digits: int = 3, signed: bool = False) -> str:
    """A :func:`lpconvert.compare.stats.summary` or :func:`~lpconvert.compare.stats.paired_difference` as "mean ± std" (the mean alone
    for one seed, "–" for none)."""
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    if stats is None:
        return "–"
    if stats["n"] == 1:
        return fmt.format(stats["mean"])
    return f"{fmt.format(stats['mean'])} ± {stats['std']:.{digits}f}"


def show_summary(values: list[float]) -> str:
    """mean ± std over seeds (:func:`lpconvert.compare.stats.summary`)."""
    return show(summary(values) if values else None)


def mean(values) -> float:
    return summary(list(values))["mean"]


def render(report: dict, keep: str) -> str:
    lines = ["# Late-phase rank-1 LSTM on tiny-shakespeare (paper Table 6 analog)", ""]
    inv = report["invocations"]
    lines += [f"{sum(i['minutes'] for i in inv):.0f} min of wall time in all (timings are not benchmarks: the machine "
              "was shared and the run may have been paused). Commands (hardware, code, minutes):", "", "```bash"]
    for i in inv:
        lines.append(f"{i['command']}    # {i['hardware']}; commit {(i['code']['commit'] or '?')[:12]}, "
                     f"{i['minutes']:.0f} min")
    lines += ["```", "", f"Data: `{report['data']['name']}`, {report['data']['chars']:,} characters "
              f"(sha256 {report['data']['sha256'][:16]}…), vocabulary of {report['data']['vocab']} characters from "
              f"the whole text; training text: the first {report['data']['train_chars']:,} characters, test: the last "
              f"{report['data']['test_chars']:,} ({report['data']['test_frac']:.0%}). Train BPC: a fixed sample of "
              "the training text of about the test's size (evenly spaced chunks).", ""]
    for label, cfg in report["configs"].items():
        rows = [r for r in report["rows"] if r["config"] == label]
        if not rows:
            continue
        seeds = sorted({r["seed"] for r in rows})
        passes = cfg["epochs"] * cfg["steps_per_epoch"] * cfg["batch_size"] * cfg["seq_len"] / report["data"]["train_chars"]
        lines += [f"## {label}", "",
                  f"LSTM {cfg['hidden']} units (embedding {cfg['embed']}), sequences of {cfg['seq_len']} characters "
                  f"from a zero state (no state carried across minibatches), batch {cfg['batch_size']}, Adam lr "
                  f"{cfg['lr']:g}, no regularisation, {cfg['epochs']} epochs × {cfg['steps_per_epoch']} minibatches "
                  f"({passes:.1f} passes over the training text); T0 = epoch {cfg['t0_epoch']} (K = {cfg['K']}, "
                  f"σ0 = {cfg['sigma0']}, γθ = 1), SWA over the last {cfg['swa_epochs']} epochs. Seeds "
                  f"{', '.join(map(str, seeds))}; mean ± std over seeds; Δ = paired difference to `base` evaluated "
                  "the same way (final, or SWA; the ensemble and the members: to base final), per seed.", "",
                  "| arm | evaluated as | train BPC | test BPC | test − train | Δ test vs base | paper test BPC |",
                  "|---|---|---:|---:|---:|---:|---:|"]
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            groups.setdefault((r["arm"], r["eval"]), []).append(r)
        twins = {other for other, c in report["configs"].items() if same_base(c, cfg)}
        base = {(r["seed"], r["eval"].split(" (")[0]): r for r in report["rows"]
                if r["arm"] == "base" and r["config"] in twins}
        for (arm, ev), rs in sorted(groups.items(), key=lambda kv: (ARMS.index(kv[0][0]), _eval_order(kv[0][1]))):
            kind = ev.split(" (")[0]
            kind = kind if kind in ("final", "SWA") else "final"  # ensemble / members alone: against base final
            paired = [(base[(r["seed"], kind)]["test_bpc"], r["test_bpc"]) for r in rs
                      if arm != "base" and (r["seed"], kind) in base]
            delta = paired_difference(*zip(*paired)) if paired else None  # per seed: arm − base
            paper = None if ev.split(" (")[0] not in ("final", "SWA") or (arm == LATE and "-K" in label) else \
                PAPER[arm][0] if kind == "final" else PAPER[arm][1]
            lines.append(f"| {arm} | {ev} | {show_summary([r['train_bpc'] for r in rs])} | "
                         f"{show_summary([r['test_bpc'] for r in rs])} | "
                         f"{show(paired_difference([r['train_bpc'] for r in rs], [r['test_bpc'] for r in rs]))} | "
                         f"{show(delta, signed=True)} | {paper if paper else '–'} |")
        late = [r for r in rows if r["arm"] == LATE and r["eval"] == "final"]
        if late:
            lines += ["", f"Late-phase arm: K = {late[0]['K_after_t0']} members after T0 (all seeds: "
                      f"{sorted({r['K_after_t0'] for r in late})}); the trained K = 1 factors u vᵀ at T0: mean "
                      f"{show_summary([r['uv_at_t0']['mean'] for r in late])}, std "
                      f"{show_summary([r['uv_at_t0']['std'] for r in late])}, range "
                      f"[{min(r['uv_at_t0']['min'] for r in late):.3f}, {max(r['uv_at_t0']['max'] for r in late):.3f}]; "
                      f"spread of the members' u_k v_kᵀ at the end (std over k, mean over entries): "
                      f"{show_summary([r['member_spread'] for r in late])}."]
        minutes = {}
        for r in rows:
            if r["eval"] == "final":
                minutes.setdefault(r["arm"], []).append(r["minutes"])
        lines += ["", "Training minutes per run (mean; the late-phase arm includes the first "
                  f"{cfg['t0_epoch']} epochs it shares with the base + rank-1 run): "
                  + ", ".join(f"{a} {mean(m):.1f}" for a, m in minutes.items()) + "."]
        curves = report["curves"].get(label, {})
        if curves:
            marks = sorted({p["epoch"] for c in curves.values() for p in c if p["epoch"] % 5 == 0
                            or p["epoch"] in (cfg["t0_epoch"], cfg["epochs"])})
            lines += ["", "Curves (mean over seeds; the model evaluated as one plain LSTM, on ~"
                      f"{report['data']['curve_chars']:,}-character subsets of the training sample / test text): "
                      "train BPC / test BPC at the end of the epoch.", "",
                      "| epoch | " + " | ".join(arm for arm in ARMS if arm in curves) + " |",
                      "|---:|" + "---:|" * sum(arm in curves for arm in ARMS)]
            for e in marks:
                cells = []
                for arm in ARMS:
                    if arm not in curves:
                        continue
                    pts = [p for p in curves[arm] if p["epoch"] == e]
                    cells.append(f"{mean(p['train_bpc'] for p in pts):.3f} / "
                                 f"{mean(p['test_bpc'] for p in pts):.3f}" if pts else "–")
                lines.append(f"| {e} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [ANALYSIS_MARKER, keep.rstrip("\n")] if keep.strip() else [ANALYSIS_MARKER]
    return "\n".join(lines) + "\n"


def _eval_order(ev: str) -> int:
    for i, prefix in enumerate(("final", "SWA", "ensemble", "members")):
        if ev.startswith(prefix):
            return i
    return 9


def write_report(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    md = out.with_suffix(".md")
    keep = ""
    if md.is_file() and ANALYSIS_MARKER in (text := md.read_text()):
        keep = text.split(ANALYSIS_MARKER, 1)[1].lstrip("\n")
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out.with_suffix(".json"))
    md.write_text(render(report, keep))


# -- main -------------------------------------------------------------------------------------------------------------
TINY = dict(text_limit=4000, hidden=16, embed=8, seq_len=16, batch_size=8, epochs=10, steps_per_epoch=3, K=3,
            lr=1e-2, seeds=[0], curve_chars=200)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED / "data/tinyshakespeare/input.txt"))
    parser.add_argument("--text-limit", type=int, default=None, help="use only the first N characters of the text")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--embed", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--steps-per-epoch", type=int, default=80, help="minibatches per 'epoch'")
    parser.add_argument("--K", type=int, default=10)
    parser.add_argument("--sigma0", type=float, default=0.35)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--factor-init", type=float, default=0.01, help="K = 1 factors uniform in [1 - a, 1 + a]")
    parser.add_argument("--t0-frac", type=float, default=0.6)
    parser.add_argument("--swa-frac", type=float, default=0.2)
    parser.add_argument("--test-frac", type=float, default=0.1)
    parser.add_argument("--curve-chars", type=int, default=20_000, help="characters of the per-epoch curve subsets")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a loaded 2-core machine 2 threads ran 3-7x slower)")
    parser.add_argument("--out", default="zoo/results/lstm_shakespeare")
    parser.add_argument("--save-models", default=None, help="a folder for the collapsed models (state dicts)")
    parser.add_argument("--append", action="store_true", help="keep and skip the runs already in --out's JSON")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (small text, model and steps)")
    args = parser.parse_args(argv)
    if args.tiny:  # tiny defaults, explicit flags still win
        parser.set_defaults(**TINY)
        args = parser.parse_args(argv)
    return args


def command_line(argv: list[str]) -> str:
    return "python scripts/lstm_shakespeare.py " + " ".join(shlex.quote(a) for a in argv)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    torch.set_num_threads(args.threads)
    text, digest = load_text(args.data, args.text_limit)
    ids, chars = encode(text)
    train, test = split(ids, args.test_frac)
    cfg = {k: getattr(args, k) for k in CONFIG_KEYS}
    cfg["t0_epoch"] = int(round(args.t0_frac * args.epochs))
    cfg["swa_epochs"] = max(1, int(round(args.swa_frac * args.epochs)))
    label = config_label(cfg)
    data = {"name": Path(args.data).name, "chars": len(text), "sha256": digest, "vocab": len(chars),
            "train_chars": len(train), "test_chars": len(test), "test_frac": args.test_frac,
            "curve_chars": args.curve_chars}
    out = Path(args.out)
    report = {"data": data, "configs": {}, "invocations": [], "rows": [], "curves": {}}
    if args.append and out.with_suffix(".json").is_file():
        report = json.loads(out.with_suffix(".json").read_text())
        if report["data"] != data:
            raise SystemExit(f"{out.with_suffix('.json')} holds runs on other data ({report['data']}); choose another "
                             "--out or drop --append")
        if label in report["configs"] and report["configs"][label] != cfg:
            raise SystemExit(f"{out.with_suffix('.json')} holds {label} with other settings; choose another --out")
    report["configs"][label] = cfg
    report["invocations"].append({"command": command_line(argv), "hardware": hardware(args.threads),
                                  "code": code_version(), "minutes": 0.0, "config": label})
    print(f"{label}: lpconvert from {report['invocations'][-1]['code']['lpconvert']}, "
          f"{len(train):,} training / {len(test):,} test characters, vocabulary {len(chars)}", flush=True)
    test_eval = test_chunks(test, args.seq_len)
    train_eval = train_sample(train, args.seq_len, len(test))
    evals = {"test": test_eval, "train": train_eval,
             "test_curve": subsample(test_eval, args.curve_chars, args.seq_len),
             "train_curve": subsample(train_eval, args.curve_chars, args.seq_len)}
    started = time.time()
    save_dir = Path(args.save_models) if args.save_models else None

    def finish(run: Run, rows: list[dict]) -> None:
        report["rows"] = [r for r in report["rows"] if not (r["config"] == label and r["arm"] == run.arm
                                                              and r["seed"] == seed)]
        report["rows"].extend(dict(r, config=label, seed=seed) for r in rows)
        curves = report["curves"].setdefault(label, {}).setdefault(run.arm, [])
        curves[:] = [p for p in curves if p["seed"] != seed] + [dict(p, seed=seed) for p in run.curve]
        report["invocations"][-1]["minutes"] = (time.time() - started) / 60
        write_report(report, out)
        print(f"{run.arm} seed {seed}: " + ", ".join(f"{r['eval']} train {r['train_bpc']:.3f} test "
                                                     f"{r['test_bpc']:.3f}" for r in rows), flush=True)

    for seed in args.seeds:
        done = {r["arm"] for r in report["rows"] if r["config"] == label and r["seed"] == seed}
        todo = [arm for arm in args.arms if arm not in done]
        if todo:
            run_seed(cfg, seed, todo, evals, len(chars), train, finish, save_dir)
    report["invocations"][-1]["minutes"] = (time.time() - started) / 60
    write_report(report, out)
    return report


if __name__ == "__main__":
    main()
