"""Common training flags: reference defaults, validation errors, --config_file."""

import pathlib

import pytest

from musubi_tuner.errors import UserError
from musubi_tuner.training.args import add_common_training_arguments, attention_mode, int_or_float, validate_training_args
from musubi_tuner.training.config_file import apply_config_file
from musubi_tuner.training.logging_utils import MovingAverage, step_logs
from musubi_tuner.utils.flag_types import FlagParser


def parser():
    return add_common_training_arguments(FlagParser(prog="train"))


def parse(*argv):
    return parser().parse_args(list(argv))


REFERENCE_DEFAULTS = {
    "max_train_steps": 1600,
    "max_train_epochs": None,
    "max_data_loader_n_workers": 8,
    "gradient_accumulation_steps": 1,
    "mixed_precision": None,
    "learning_rate": 2e-6,
    "max_grad_norm": 1.0,
    "optimizer_type": "",
    "optimizer_args": None,
    "lr_scheduler": "constant",
    "lr_warmup_steps": 0,
    "lr_decay_steps": 0,
    "lr_scheduler_num_cycles": 1,
    "lr_scheduler_power": 1,
    "lr_scheduler_type": "",
    "timestep_sampling": "sigma",
    "discrete_flow_shift": 1.0,
    "sigmoid_scale": 1.0,
    "weighting_scheme": "none",
    "logit_mean": 0.0,
    "logit_std": 1.0,
    "mode_scale": 1.29,
    "guidance_scale": 1.0,
    "min_timestep": None,
    "max_timestep": None,
    "network_alpha": 1,
    "network_dim": None,
    "compile_backend": "inductor",
    "compile_mode": "default",
    "dynamo_backend": "NO",
    "blocks_to_swap": None,
    "block_swap_ring_size": 2,
    "fp8_base": False,
    "fp8_scaled": False,
    "vae_dtype": None,
    "save_precision": "fp32",
    "sdpa": False,
    "seed": None,
}


def test_reference_defaults():
    args = parse()
    for key, value in REFERENCE_DEFAULTS.items():
        assert getattr(args, key) == value, key
    validate_training_args(args)


@pytest.mark.parametrize("text,value", [("10", 10), ("0.1", 0.1), ("10%", 0.1), ("1.0", 1), ("0", 0.0), ("1.5", 1.5)])
def test_int_or_float(text, value):
    parsed = int_or_float(text)
    assert parsed == value and type(parsed) is type(value)


def test_int_or_float_rejects_words_and_nan():
    with pytest.raises(UserError, match="--lr_warmup_steps"):
        parse("--lr_warmup_steps", "ten")
    with pytest.raises(UserError, match="--lr_warmup_steps.*finite"):
        parse("--lr_warmup_steps", "nan")


def test_attention():
    assert attention_mode(parse()) == "sdpa"
    assert attention_mode(parse("--xformers", "--split_attn")) == "xformers"
    with pytest.raises(UserError, match="--sage_attn"):
        validate_training_args(parse("--sage_attn"))
    with pytest.raises(UserError, match="--sdpa and --flash_attn"):
        validate_training_args(parse("--sdpa", "--flash_attn"))


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--max_train_epochs", "0"], "--max_train_epochs"),
        (["--max_train_steps", "0"], "--max_train_steps"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps"),
        (["--save_every_n_steps", "10", "--save_last_n_steps", "-1"], "--save_last_n_steps"),
        (["--save_every_n_epochs", "1", "--save_last_n_epochs_state", "0"], "--save_last_n_epochs_state"),
        (["--save_last_n_epochs", "2"], "--save_every_n_epochs"),
        (["--save_every_n_steps", "0"], "--save_every_n_steps"),
        (["--lr_warmup_steps", "1.5"], "--lr_warmup_steps"),
        (["--lr_decay_steps", "-3"], "--lr_decay_steps"),
        (["--fp8_scaled"], "--fp8_base"),
        (["--min_timestep", "500", "--max_timestep", "500"], "--min_timestep"),
        (["--max_timestep", "1001"], "--max_timestep"),
        (["--discrete_flow_shift", "0"], "--discrete_flow_shift"),
        (["--blocks_to_swap", "-1"], "--blocks_to_swap"),
        (["--learning_rate", "-1"], "--learning_rate"),
        (["--huggingface_repo_id", "me/x"], "not supported in this build"),
        (["--resume_from_huggingface"], "--resume_from_huggingface"),
    ],
)
def test_validation_names_the_flag(argv, flag):
    with pytest.raises(UserError) as err:
        validate_training_args(parse(*argv))
    assert flag in str(err.value)


CONFIG = """
max_train_steps = 10
sdpa = true

[model]
dit = "models/dit.safetensors"
dataset_config = "data.toml"

[optimizer]
learning_rate = 1e-4
optimizer_args = ["weight_decay=0.01", "betas=0.9,0.99"]
lr_warmup_steps = 100.0
lr_decay_steps = 0.25
max_grad_norm = 0

[timesteps]
timestep_sampling = "shift"
min_timestep = 100
"""


def test_config_file_flattened_and_overridden(tmp_path):
    path = tmp_path / "cfg.toml"
    path.write_text(CONFIG)
    args = apply_config_file(parser(), ["--config_file", str(tmp_path / "cfg"), "--max_train_steps", "20", "--learning_rate", "3e-4"])
    assert args.max_train_steps == 20 and args.learning_rate == 3e-4  # CLI wins
    assert args.sdpa is True and args.dit == "models/dit.safetensors"
    assert args.dataset_config == pathlib.Path("data.toml")
    assert args.optimizer_args == ["weight_decay=0.01", "betas=0.9,0.99"]
    assert args.lr_warmup_steps == 100 and type(args.lr_warmup_steps) is int
    assert args.lr_decay_steps == 0.25
    assert args.max_grad_norm == 0.0 and isinstance(args.max_grad_norm, float)
    assert args.timestep_sampling == "shift" and args.min_timestep == 100
    assert args.mixed_precision is None  # untouched defaults stay
    assert args.config_file == str(path)
    validate_training_args(args)


def test_no_config_file_is_plain_parse():
    assert apply_config_file(parser(), ["--max_train_steps", "5"]).max_train_steps == 5


@pytest.mark.parametrize(
    "text,needle",
    [
        ("learnin_rate = 1\n[x]\nfoo = 2\n", "unknown keys foo, learnin_rate"),
        ('mixed_precision = "bf17"\n', "mixed_precision"),
        ('sdpa = "yes"\n', "--sdpa"),
        ("max_train_steps = 1.5\n", "max_train_steps"),
        ("max_train_steps = [1, 2]\n", "max_train_steps"),
        ("max_train_steps = \n", "not valid TOML"),
    ],
)
def test_config_file_errors(tmp_path, text, needle):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UserError, match="bad.toml") as err:
        apply_config_file(parser(), ["--config_file", str(path)])
    assert needle in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="--config_file.*missing.toml not found"):
        apply_config_file(parser(), ["--config_file", str(tmp_path / "missing")])


# ---- step logs ------------------------------------------------------------------------------------


def test_step_logs_names():
    assert step_logs(0.5, 0.4, [1e-4]) == {"loss/current": 0.5, "loss/average": 0.4, "lr/unet": 1e-4}
    logs = step_logs(0.5, 0.4, [1e-4, 2e-4], keys_scaled=3, mean_norm=0.1, max_norm=0.2)
    assert logs["lr/group0"] == 1e-4 and logs["lr/group1"] == 2e-4
    assert logs["max_norm/keys_scaled"] == 3 and logs["max_norm/max_key_norm"] == 0.2
    named = step_logs(1, 1, [1e-4, 2e-4], lr_descriptions=["unet_lora_up", "unet_lora_down"])
    assert "lr/unet_lora_up" in named and "lr/unet_lora_down" in named
    prodigy = step_logs(1, 1, [1.0], optimizer_type="prodigyopt.Prodigy", param_groups=[{"d": 2e-6, "lr": 1.0}])
    assert prodigy["lr/d*lr/unet"] == 2e-6


def test_moving_average_is_one_epoch_window():
    avg = MovingAverage()
    for step, loss in enumerate([1.0, 2.0, 3.0]):
        avg.add(epoch=0, step=step, loss=loss)
    assert avg.average == pytest.approx(2.0)
    avg.add(epoch=1, step=0, loss=4.0)  # replaces 1.0
    assert avg.average == pytest.approx(3.0)
    restored = MovingAverage()
    restored.load_state_dict(avg.state_dict())
    restored.add(epoch=1, step=1, loss=5.0)
    assert restored.average == pytest.approx(4.0)
    assert MovingAverage().average == 0.0


def test_moving_average_running_counters():
    avg = MovingAverage()
    for loss in (1.0, 2.0, 3.0):
        avg.add(loss)
    avg.new_epoch()
    avg.add(5.0)  # replaces the first epoch's first loss
    assert avg.value == pytest.approx((5.0 + 2.0 + 3.0) / 3)
