"""lpconvert: late-phase weights (von Oswald, Kobayashi et al., ICLR 2021) for pretrained vision models.

>>> model = lpconvert.convert(timm.create_model("resnet50", pretrained=True), K=10)   # T0 = the checkpoint
>>> engine = lpconvert.LatePhaseEngine(model, partial(torch.optim.SGD, lr=1e-3, momentum=0.9))
>>> for xs, ys in lpconvert.iterate_members(loader, K=10): engine.step(xs, ys)          # Algorithm 1
>>> averaged = lpconvert.collapse(model)                                                # Eq. 1: original architecture
>>> lpconvert.save_pretrained(averaged, "resnet50-lp")                                 # safetensors, config, card
"""

from . import hub_env  # noqa: F401, I001  (first: a malformed HF_ENDPOINT must not traceback when timm imports the Hub)
from . import compat  # noqa: F401  (second, before torch: a torch / torchvision pair that does not match is one line)
from . import models  # noqa: F401  (registers lpconvert's architectures (cifar_resnet20, digits_cnn, …) with timm)
from .collapse import collapse, ensemble_predict, recalibrate_batch_norm, unload
from .collapse.soup import choose_alpha, greedy_soup, interpolate
from .convert.late_phase_config import LatePhaseConfig, late_phase_config
from .convert.members import late_phase_layers, num_members, select_members
from .convert.surgery import Plan, convert, convert_from_config, plan
from .errors import LatePhaseError
from .layers import KINDS
from .publish.loading import load_model
from .publish.model_folder import save_pretrained
from .run.saved import load_late_phase
from .train.engine import LatePhaseEngine, iterate_members
from .train.switch import enter_late_phase
from .version import lpconvert_version

__version__ = lpconvert_version()

__all__ = [
    "KINDS",
    "LatePhaseConfig",
    "LatePhaseEngine",
    "LatePhaseError",
    "Plan",
    "choose_alpha",
    "collapse",
    "convert",
    "convert_from_config",
    "ensemble_predict",
    "enter_late_phase",
    "greedy_soup",
    "interpolate",
    "iterate_members",
    "late_phase_config",
    "late_phase_layers",
    "load_late_phase",
    "load_model",
    "num_members",
    "plan",
    "recalibrate_batch_norm",
    "save_pretrained",
    "select_members",
    "unload",
]
