"""Adam, the learning-rate schedule and the EMA of the weights (AF2 Suppl. 1.11.3, 1.11.7).

AF2 Suppl. 1.11.3: Adam (beta1 0.9, beta2 0.999, eps 1e-6), the learning rate warmed up linearly from 0
to 1e-3 over the first 1000 steps, then multiplied by 0.95 every 50k steps after the first 50k; gradients
clipped to a global norm of 0.1. AF2 Suppl. 1.11.7: the weights used for evaluation are an exponential
moving average of the trained weights with decay 0.999. The MLPerf HPC OpenFold benchmark
(``af2_initial``) uses a constant 1e-3 without warm-up and decay 0.9; both are :class:`TrainConfig`
values, not code.

Step convention: ``step`` is the number of updates already taken, so the update with index ``step``
(0-based) uses ``lr * lr_factor(step)``: the first update uses ``lr / warmup_steps``, update
``warmup_steps - 1`` the full rate, and update ``decay_start`` is the first one at ``0.95 * lr``.
(OpenFold's scheduler is one update later on both ends: its first update uses lr 0.)
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from foldforge.config import LossConfig, TrainConfig

SCHEDULES = ("af2", "constant")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` for the update with 0-based index ``step``."""
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {cfg.schedule!r}; choose from {', '.join(SCHEDULES)}")
    factor = 1.0
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        factor = (step + 1) / cfg.warmup_steps                      # linear warm-up from ~0
    if cfg.schedule == "af2" and step >= cfg.decay_start:
        decays = (step - cfg.decay_start) // cfg.decay_every + 1    # x0.95 at decay_start, then every 50k
        factor *= cfg.decay_factor ** decays
    return factor


def lr_at(step: int, cfg: TrainConfig) -> float:
    return cfg.lr * lr_factor(step, cfg)


# Loss weight -> head module (``model.heads.<name>``). A head whose loss weight is 0 gets no gradient
# (af2_loss evaluates its term under no_grad for logging), which DDP would report as an unused parameter.
HEAD_LOSS_WEIGHTS = {
    "experimentally_resolved": "experimentally_resolved_weight",
    "tm": "tm_weight",
    "plddt": "plddt_weight",
    "distogram": "distogram_weight",
    "masked_msa": "masked_msa_weight",
}


def freeze_zero_weight_heads(model: nn.Module, loss_cfg: LossConfig) -> list[str]:
    """Set ``requires_grad=False`` on the heads whose loss weight is 0 (the MLPerf initial-training config
    turns off the experimentally-resolved loss); returns their names. They stay in the checkpoint and the
    EMA at their initial values, so the same model class loads either way. Done in one and N processes
    alike, so a 1-process run and a DDP run update exactly the same parameters."""
    heads = getattr(model, "heads", None)
    frozen = []
    for name, weight_field in HEAD_LOSS_WEIGHTS.items():
        head = getattr(heads, name, None) if heads is not None else None
        if head is not None and getattr(loss_cfg, weight_field) == 0:
            head.requires_grad_(False)
            frozen.append(name)
    return frozen


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig, device: torch.device
                   ) -> tuple[torch.optim.Adam, torch.optim.lr_scheduler.LambdaLR]:
    """Adam over the trainable fp32 master weights and its schedule (``scheduler.step()`` once per step,
    skipped updates included, so the rate is a function of the step alone)."""
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                           fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, cfg))
    return opt, sched


class EMA:
    """Exponential moving average of the model's weights (AF2 Suppl. 1.11.7), an fp32 shadow copy.

    ``shadow = decay * shadow + (1 - decay) * param`` after every applied update (not after a skipped
    one); buffers are copied as they are. The shadow starts equal to the initial weights. It is what
    evaluation uses (:meth:`copy_to` into a separate model) and what the checkpoint saves as ``ema``.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow: dict[str, Tensor] = {k: v.detach().float().clone() if v.is_floating_point() else
                                          v.detach().clone() for k, v in model.state_dict().items()}
        self.num_updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        floats, targets = [], []
        for name, value in model.state_dict().items():
            shadow = self.shadow[name]
            if name in params and params[name].requires_grad:
                floats.append(shadow)
                targets.append(value.detach().float())
            else:
                shadow.copy_(value)
        if floats:   # shadow += (1 - decay) * (param - shadow), fused over all tensors
            torch._foreach_lerp_(floats, targets, 1.0 - self.decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> nn.Module:
        """Load the averaged weights into ``model`` (an evaluation copy) and return it."""
        model.load_state_dict(self.shadow)
        return model

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state does not match the model: {sorted(missing)[:5]}")
        for name, value in state["shadow"].items():
            self.shadow[name].copy_(value)
        self.num_updates = int(state["num_updates"])
