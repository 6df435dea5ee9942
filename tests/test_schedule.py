import pytest
import torch

from evostar.config import OptimConfig
from evostar.train import ProgressSchedule


def _opt(lr=1.0):
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_schedule_shapes(schedule):
    sched = ProgressSchedule(_opt(), OptimConfig(lr=1.0, schedule=schedule, min_lr_ratio=0.1))
    lrs = []
    for p in (0.0, 0.5, 1.0):
        sched.set_progress(p)
        lrs.append(sched.optimizer.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1.0)
    if schedule == "constant":
        assert lrs == pytest.approx([1.0, 1.0, 1.0])
    else:
        assert lrs[1] == pytest.approx(0.55) and lrs[2] == pytest.approx(0.1)


def test_wsd_holds_then_decays():
    sched = ProgressSchedule(_opt(), OptimConfig(lr=1.0, schedule="wsd", decay_ratio=0.25, min_lr_ratio=0.0))
    lrs = {}
    for p in (0.0, 0.5, 0.75, 0.875, 1.0):
        sched.set_progress(p)
        lrs[p] = sched.optimizer.param_groups[0]["lr"]
    assert lrs == pytest.approx({0.0: 1.0, 0.5: 1.0, 0.75: 1.0, 0.875: 0.5, 1.0: 0.0})
    with pytest.raises(ValueError, match="decay_ratio"):
        ProgressSchedule(_opt(), OptimConfig(schedule="wsd", decay_ratio=0.0))


def test_warmup_and_state_round_trip():
    cfg = OptimConfig(lr=2.0, schedule="cosine", warmup_ratio=0.2, min_lr_ratio=0.0)
    sched = ProgressSchedule(_opt(2.0), cfg)
    sched.set_progress(0.1)
    assert 0.9 < sched.optimizer.param_groups[0]["lr"] < 1.1  # half-way through the warm-up
    state = sched.state_dict()
    other = ProgressSchedule(_opt(2.0), cfg)
    other.load_state_dict(state)
    assert other.optimizer.param_groups[0]["lr"] == sched.optimizer.param_groups[0]["lr"]


def test_unknown_schedule_is_refused_by_the_config():
    with pytest.raises(ValueError, match="schedule='step': choose one of"):
        ProgressSchedule(_opt(), OptimConfig(schedule="step"))
