"""Optimizers and LR schedulers built from the reference's flags."""

import argparse
import math
import sys
import types

import pytest
import torch

from musubi_tuner.errors import UserError
from musubi_tuner.training.args import add_common_training_arguments
from musubi_tuner.training.lr_schedulers import ConstantLogScheduler, RexLR, build_lr_scheduler
from musubi_tuner.training.optimizers import (
    build_optimizer,
    optimizer_eval_mode,
    optimizer_train_mode,
    parse_key_value_args,
)


def make_args(*argv):
    return add_common_training_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def params():
    return [torch.nn.Parameter(torch.ones(3))]


def lr_curve(argv, total=100, steps=None, lr="1.0"):
    args = make_args("--learning_rate", lr, *argv)
    opt, info = build_optimizer(args, params())
    sched = build_lr_scheduler(args, opt, total, info)
    curve = []
    for _ in range(steps if steps is not None else total + 1):
        curve.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return curve


# ---- optimizers ---------------------------------------------------------------------------------


def test_default_is_adamw_and_keeps_group_lrs():
    args = make_args("--learning_rate", "1e-3")
    groups = [{"params": params(), "lr": 5e-4}, {"params": params()}]
    opt, info = build_optimizer(args, groups)
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["lr"] for g in opt.param_groups] == [5e-4, 1e-3]
    assert info.name == "torch.optim.adamw.AdamW" and info.metadata_value == info.name


def test_optimizer_args_are_literals():
    args = make_args("--optimizer_args", "weight_decay=0.05", "betas=0.8,0.99", "amsgrad=True")
    opt, info = build_optimizer(args, params())
    group = opt.param_groups[0]
    assert (group["weight_decay"], group["betas"], group["amsgrad"]) == (0.05, (0.8, 0.99), True)
    assert info.metadata_value == "torch.optim.adamw.AdamW(weight_decay=0.05,betas=(0.8, 0.99),amsgrad=True)"


@pytest.mark.parametrize("bad,needle", [("weight_decay=abc", "weight_decay"), ("novalue", "novalue"), ("=1", "key=value")])
def test_optimizer_args_errors_name_the_arg(bad, needle):
    with pytest.raises(UserError, match="--optimizer_args") as err:
        build_optimizer(make_args("--optimizer_args", bad), params())
    assert needle in str(err.value)


def test_unknown_optimizer_kwarg_is_user_error():
    with pytest.raises(UserError, match="--optimizer_args"):
        build_optimizer(make_args("--optimizer_args", "nonsense=1"), params())


def test_adamw8bit_without_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now fails
    with pytest.raises(UserError, match="pip install bitsandbytes"):
        build_optimizer(make_args("--optimizer_type", "AdamW8bit"), params())


@pytest.mark.parametrize("name,cls", [("SGD", torch.optim.SGD), ("torch.optim.RMSprop", torch.optim.RMSprop), ("adamw", torch.optim.AdamW)])
def test_class_paths(name, cls):
    opt, info = build_optimizer(make_args("--optimizer_type", name), params())
    assert type(opt) is cls and not info.schedule_free


@pytest.mark.parametrize("name", ["torch.optim.Nope", "no_such_package_xyz.Opt"])
def test_unknown_optimizer_class(name):
    with pytest.raises(UserError, match="--optimizer_type"):
        build_optimizer(make_args("--optimizer_type", name), params())


def test_adafactor_relative_step_uses_adafactor_schedule():
    from transformers.optimization import Adafactor, AdafactorSchedule

    args = make_args("--optimizer_type", "AdaFactor", "--learning_rate", "1e-3")
    opt, info = build_optimizer(args, params())
    assert isinstance(opt, Adafactor) and info.adafactor_relative_step and opt.defaults["lr"] is None
    sched = build_lr_scheduler(args, opt, 100, info)
    assert isinstance(sched, AdafactorSchedule)
    assert sched.get_last_lr()[0] == pytest.approx(1e-3)
    with pytest.raises(UserError, match="--lr_warmup_steps"):
        build_lr_scheduler(make_args("--optimizer_type", "adafactor", "--lr_warmup_steps", "5"), opt, 100, info)


def test_adafactor_fixed_lr():
    args = make_args("--optimizer_type", "adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False", "--learning_rate", "1e-3")
    opt, info = build_optimizer(args, params())
    assert not info.adafactor_relative_step and opt.param_groups[0]["lr"] == 1e-3
    assert isinstance(build_lr_scheduler(args, opt, 10, info), torch.optim.lr_scheduler.LambdaLR)


def test_adafactor_scheduler_needs_adafactor():
    args = make_args("--lr_scheduler", "adafactor")
    opt, info = build_optimizer(args, params())
    with pytest.raises(UserError, match="adafactor"):
        build_lr_scheduler(args, opt, 10, info)


def test_schedule_free_gets_dummy_scheduler(monkeypatch):
    calls = []

    class AdamWScheduleFree(torch.optim.SGD):
        def train(self):
            calls.append("train")

        def eval(self):
            calls.append("eval")

    module = types.ModuleType("fake_schedulefree")
    module.AdamWScheduleFree = AdamWScheduleFree
    monkeypatch.setitem(sys.modules, "fake_schedulefree", module)
    args = make_args("--optimizer_type", "fake_schedulefree.AdamWScheduleFree", "--learning_rate", "0.5", "--lr_scheduler", "cosine")
    opt, info = build_optimizer(args, params())
    assert info.schedule_free
    sched = build_lr_scheduler(args, opt, 10, info)
    assert isinstance(sched, ConstantLogScheduler)
    sched.step()
    assert sched.get_last_lr() == [0.5]
    optimizer_train_mode(opt)
    optimizer_eval_mode(opt)
    optimizer_train_mode(torch.optim.SGD(params(), lr=1))  # plain optimizers: no-op
    assert calls == ["train", "eval"]


def test_parse_key_value_args_empty():
    assert parse_key_value_args(None, "--x") == {}


# ---- schedulers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "cosine", "constant_with_warmup", "cosine_with_restarts", "polynomial", "rex"])
def test_warmup_as_steps_or_ratio_is_the_same(name):
    assert lr_curve(["--lr_scheduler", name, "--lr_warmup_steps", "10"]) == lr_curve(["--lr_scheduler", name, "--lr_warmup_steps", "0.1"])
    assert lr_curve(["--lr_scheduler", name, "--lr_warmup_steps", "10%"]) == lr_curve(["--lr_scheduler", name, "--lr_warmup_steps", "10"])


def test_constant():
    assert set(lr_curve(["--lr_scheduler", "constant"], steps=5, lr="0.3")) == {0.3}
    with pytest.raises(UserError, match="--lr_warmup_steps"):
        lr_curve(["--lr_scheduler", "constant", "--lr_warmup_steps", "3"])


def test_constant_with_warmup():
    c = lr_curve(["--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "10"], steps=20)
    assert c[0] == 0 and c[5] == pytest.approx(0.5) and c[10] == c[19] == 1.0


def test_linear_and_cosine():
    lin = lr_curve(["--lr_scheduler", "linear", "--lr_warmup_steps", "10"])
    assert lin[5] == pytest.approx(0.5) and lin[55] == pytest.approx(0.5) and lin[100] == 0
    cos = lr_curve(["--lr_scheduler", "cosine", "--lr_warmup_steps", "10"])
    assert cos[10] == pytest.approx(1.0) and cos[55] == pytest.approx(0.5) and cos[100] == pytest.approx(0, abs=1e-12)


def test_cosine_with_restarts():
    c = lr_curve(["--lr_scheduler", "cosine_with_restarts", "--lr_scheduler_num_cycles", "2"])
    assert c[25] == pytest.approx(0.5) and c[50] == pytest.approx(1.0) and c[75] == pytest.approx(0.5)


def test_polynomial_power():
    c = lr_curve(["--lr_scheduler", "polynomial", "--lr_scheduler_power", "2"])
    lr_end = 1e-7
    assert c[50] == pytest.approx((1 - lr_end) * 0.5**2 + lr_end)
    assert c[100] == pytest.approx(lr_end)


def test_inverse_sqrt():
    c = lr_curve(["--lr_scheduler", "inverse_sqrt", "--lr_warmup_steps", "10"], steps=41)
    assert c[5] == pytest.approx(0.5) and c[10] == pytest.approx(1.0) and c[40] == pytest.approx(0.5)
    c = lr_curve(["--lr_scheduler", "inverse_sqrt", "--lr_warmup_steps", "10", "--lr_scheduler_timescale", "40"], steps=41)
    assert c[40] == pytest.approx(1 / math.sqrt(70 / 40))


def test_cosine_with_min_lr():
    c = lr_curve(["--lr_scheduler", "cosine_with_min_lr", "--lr_scheduler_min_lr_ratio", "0.1"])
    assert c[50] == pytest.approx(0.55) and c[100] == pytest.approx(0.1)
    with pytest.raises(UserError, match="--lr_scheduler_min_lr_ratio"):
        lr_curve(["--lr_scheduler", "cosine_with_min_lr"])


def test_warmup_stable_decay():
    argv = ["--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "10", "--lr_decay_steps", "0.2"]
    c = lr_curve(argv + ["--lr_scheduler_min_lr_ratio", "0.1"])
    assert c[5] == pytest.approx(0.1 + 0.9 * 0.5)  # warmup starts from the min ratio in transformers' WSD
    assert c[10] == c[50] == c[80] == pytest.approx(1.0)
    assert c[90] == pytest.approx(0.1 + 0.9 * 0.5)
    assert c[100] == pytest.approx(0.1)
    with pytest.raises(UserError, match="--lr_decay_steps"):
        lr_curve(["--lr_scheduler", "warmup_stable_decay", "--lr_warmup_steps", "60", "--lr_decay_steps", "50"])


def test_piecewise_constant():
    c = lr_curve(["--lr_scheduler", "piecewise_constant", "--lr_scheduler_args", "step_rules='1:10,0.1:20,0.01'"], steps=25)
    assert c[9] == 1.0 and c[10] == pytest.approx(0.1) and c[19] == pytest.approx(0.1) and c[20] == pytest.approx(0.01)
    with pytest.raises(UserError, match="--lr_scheduler_args"):
        lr_curve(["--lr_scheduler", "piecewise_constant"])


def rex_factor(z, m):
    return m + (1 - m) * z / (0.1 + 0.9 * z)


def test_rex():
    c = lr_curve(["--lr_scheduler", "rex"], lr="2.0")
    assert c[0] == pytest.approx(2.0)
    assert c[50] == pytest.approx(2.0 * rex_factor(0.5, 0.01))
    assert c[100] == pytest.approx(0.02)
    w = lr_curve(["--lr_scheduler", "rex", "--lr_warmup_steps", "10", "--lr_scheduler_min_lr_ratio", "0.1"], lr="1.0")
    assert w[0] == w[1] == pytest.approx(0.1)
    assert w[5] == pytest.approx(0.1 + 0.9 * 4 / 9)
    assert w[55] == pytest.approx(rex_factor(0.5, 0.1))


def test_rex_state_round_trip():
    opt = torch.optim.SGD(params(), lr=1.0)
    sched = RexLR(opt, max_lr=1.0, min_lr=0.1, num_steps=20)
    for _ in range(7):
        opt.step()
        sched.step()
    opt2 = torch.optim.SGD(params(), lr=1.0)
    sched2 = RexLR(opt2, max_lr=1.0, min_lr=0.1, num_steps=20)
    sched2.load_state_dict(sched.state_dict())
    opt.step(), sched.step(), opt2.step(), sched2.step()
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_custom_scheduler_type():
    argv = ["--lr_scheduler_type", "torch.optim.lr_scheduler.StepLR", "--lr_scheduler_args", "step_size=10", "gamma=0.5"]
    c = lr_curve(argv, steps=21)
    assert c[9] == 1.0 and c[10] == 0.5 and c[20] == 0.25
    assert lr_curve(["--lr_scheduler_type", "StepLR", "--lr_scheduler_args", "step_size=10"], steps=11)[10] == pytest.approx(0.1)
    with pytest.raises(UserError, match="--lr_scheduler_args"):
        lr_curve(["--lr_scheduler_type", "StepLR"])


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--lr_scheduler", "nope"], "--lr_scheduler"),
        (["--lr_scheduler", "linear", "--lr_warmup_steps", "1.5"], "--lr_warmup_steps"),
        (["--lr_scheduler_args", "T_max"], "--lr_scheduler_args"),
    ],
)
def test_scheduler_errors(argv, needle):
    with pytest.raises(UserError, match=needle):
        lr_curve(argv)


def test_scheduler_infers_adafactor_without_info():
    from transformers.optimization import AdafactorSchedule

    args = make_args("--optimizer_type", "adafactor", "--learning_rate", "1e-3")
    opt, _ = build_optimizer(args, params())
    assert isinstance(build_lr_scheduler(args, opt, 100), AdafactorSchedule)
