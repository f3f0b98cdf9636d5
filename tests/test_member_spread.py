"""scripts/member_spread.py on real digits runs: spread grows with the members' learning rate; θ's move is exact."""


import pytest
import safetensors.torch
import timm
import torch
from script_module import load_script

import lpconvert
from lpconvert.config import FinetuneConfig
from lpconvert.convert.members import late_phase_layers
from lpconvert.train.finetune import DIGITS, run

member_spread = load_script("member_spread")


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("start") / "digits.safetensors"
    safetensors.torch.save_file(timm.create_model("digits_cnn").state_dict(), str(path))
    return path


def _run(tmp_path, start, member_lr):
    out = tmp_path / f"run-{member_lr}"
    run(FinetuneConfig(model="digits_cnn", weights=str(start), K=3, epochs=1, lr=0.02, member_lr=member_lr,
                       late_phase=("batchnorm", "classifier"), data=DIGITS, batch_size=40, workers=0,
                       schedule="constant", quiet=True, output=str(out)))
    return out


def test_spread_and_moves(tmp_path, start):
    slow, fast = (member_spread.spread(str(_run(tmp_path, start, lr)), "last") for lr in (0.002, 0.2))
    assert 0 < slow["member spread"] and 3 * slow["member spread"] < fast["member spread"]
    assert 0 < slow["averaged move"] < fast["averaged move"]
    # θ is untouched by collapse, so the exported model gives θ's move independently of the script
    late, _ = lpconvert.load_late_phase(tmp_path / "run-0.2", "last")
    late_names = {f"{layer}.{n}" for layer, m in late_phase_layers(late).items() for n, _ in m.named_parameters()}
    shared = [n for n, _ in timm.create_model("digits_cnn").named_parameters() if n not in late_names]
    theta = safetensors.torch.load_file(str(tmp_path / "run-0.2" / "model" / "model.safetensors"))
    theta0 = safetensors.torch.load_file(str(start))
    assert shared and len(shared) < len(theta0)
    moved = sum((theta[k] - theta0[k]).double().pow(2).sum() for k in shared)
    norm = sum(theta0[k].double().pow(2).sum() for k in shared)
    assert fast["shared move"] == pytest.approx((moved / norm).sqrt().item(), rel=1e-6)

def test_random_start_is_refused(tmp_path):
    out = tmp_path / "random"
    run(FinetuneConfig(model="digits_cnn", pretrained=False, K=2, epochs=1, data=DIGITS, batch_size=40, workers=0,
                       quiet=True, output=str(out)))
    with pytest.raises(SystemExit, match="random initialisation"):
        member_spread.spread(str(out), "last")
