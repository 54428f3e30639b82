"""The AF2 learning-rate schedule, the EMA update and the freezing of zero-weight heads."""
import math

import pytest
import torch

from foldforge.config import LossConfig, TrainConfig
from foldforge.model.af2.model import AlphaFold2
from foldforge.presets import af2_initial, tiny_af2
from foldforge.train.optim import EMA, freeze_zero_weight_heads, lr_at, make_optimizer


def test_af2_schedule_values():
    """AF2 Suppl. 1.11.3: linear warm-up over 1000 steps to 1e-3, x0.95 every 50k steps after 50k."""
    cfg = TrainConfig(lr=1e-3, schedule="af2", warmup_steps=1000, decay_start=50_000, decay_every=50_000,
                      decay_factor=0.95)
    assert lr_at(0, cfg) == pytest.approx(1e-6)          # first update: lr / warmup
    assert lr_at(499, cfg) == pytest.approx(0.5e-3)
    assert lr_at(999, cfg) == pytest.approx(1e-3)        # last warm-up update: the full rate
    assert lr_at(1000, cfg) == lr_at(49_999, cfg) == pytest.approx(1e-3)
    assert lr_at(50_000, cfg) == pytest.approx(0.95e-3)  # first decayed update
    assert lr_at(99_999, cfg) == pytest.approx(0.95e-3)
    assert lr_at(100_000, cfg) == pytest.approx(0.95 ** 2 * 1e-3)
    assert lr_at(250_000, cfg) == pytest.approx(0.95 ** 5 * 1e-3)


def test_constant_schedule_and_presets():
    cfg = af2_initial().train                            # MLPerf: constant 1e-3, no warm-up
    assert [lr_at(s, cfg) for s in (0, 1, 60_000, 10**6)] == [1e-3] * 4
    cfg = TrainConfig(schedule="constant", warmup_steps=10, lr=2e-3)
    assert lr_at(4, cfg) == pytest.approx(1e-3) and lr_at(10**6, cfg) == 2e-3
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_at(0, TrainConfig(schedule="cosine"))


def test_scheduler_drives_the_optimizer():
    cfg = TrainConfig(lr=1e-3, warmup_steps=4)
    p = torch.nn.Parameter(torch.zeros(3))
    opt, sched = make_optimizer([p], cfg, torch.device("cpu"))
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        p.grad = torch.ones(3)
        opt.step()
        sched.step()
    assert seen == pytest.approx([lr_at(s, cfg) for s in range(6)])
    assert opt.param_groups[0]["eps"] == 1e-6 and opt.param_groups[0]["betas"] == (0.9, 0.999)


def test_ema_update_math():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    ema = EMA(model, decay=0.9)
    w0 = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(5.0)  # a buffer: copied, not averaged
    ema.update(model)
    expected = 0.9 * w0 + 0.1 * (w0 + 1.0)
    torch.testing.assert_close(ema.shadow["0.weight"], expected, rtol=0, atol=1e-6)
    assert torch.equal(ema.shadow["1.running_mean"], torch.full((3,), 5.0))
    # k more updates at fixed weights w: shadow -> w + 0.9^k (shadow - w)
    w = model[0].weight.detach().clone()
    gap = ema.shadow["0.weight"] - w
    for _ in range(5):
        ema.update(model)
    torch.testing.assert_close(ema.shadow["0.weight"], w + 0.9 ** 5 * gap, rtol=0, atol=1e-6)
    # the shadow is an fp32 copy, not the parameters themselves; copy_to loads it into another model
    assert ema.shadow["0.weight"].data_ptr() != model[0].weight.data_ptr()
    other = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    torch.testing.assert_close(ema.copy_to(other)[0].weight, ema.shadow["0.weight"])
    # state round trip
    fresh = EMA(other, decay=0.9)
    fresh.load_state_dict(ema.state_dict())
    assert fresh.num_updates == 6 and torch.equal(fresh.shadow["0.weight"], ema.shadow["0.weight"])


def test_ema_shadow_is_fp32_for_bf16_weights():
    model = torch.nn.Linear(4, 4).to(torch.bfloat16)
    ema = EMA(model, decay=0.999)
    assert ema.shadow["weight"].dtype == torch.float32
    ema.update(model)
    assert ema.shadow["weight"].dtype == torch.float32
    with pytest.raises(ValueError):
        EMA(model, decay=1.0)


def test_zero_weight_heads_are_frozen_and_every_other_parameter_gets_a_gradient(sample_cache):
    """DDP without find_unused_parameters needs a gradient for every trainable parameter."""
    from foldforge.data.batch import collate
    from foldforge.data.dataset import AF2Dataset, SampleKey
    from foldforge.model.af2.losses import af2_loss

    cfg = tiny_af2()
    assert cfg.loss.experimentally_resolved_weight == 0
    torch.manual_seed(0)
    model = AlphaFold2(cfg.model)
    assert freeze_zero_weight_heads(model, cfg.loss) == ["experimentally_resolved"]
    assert not any(p.requires_grad for p in model.heads.experimentally_resolved.parameters())
    ds = AF2Dataset(sample_cache, cfg.data, seed=0)
    batch = collate([ds[SampleKey(0)]]).as_dict()
    for recycles in (0, 1):
        model.zero_grad(set_to_none=True)
        loss, _ = af2_loss(model(batch, num_recycles=recycles), batch, cfg.loss)
        loss.backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, missing
    model2 = AlphaFold2(cfg.model)
    assert freeze_zero_weight_heads(model2, LossConfig(experimentally_resolved_weight=0.01)) == []
    assert math.isclose(sum(p.numel() for p in model2.parameters() if p.requires_grad),
                        sum(p.numel() for p in model2.parameters()))
