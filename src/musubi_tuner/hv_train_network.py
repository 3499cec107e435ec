"""`hv_train_network.py`: train a HunyuanVideo LoRA (reference-compatible flags; see docs/hunyuan_video.md)."""

from musubi_tuner.cli import run_cli
from musubi_tuner.training.cli import train_main


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda args: train_main("hunyuan_video", args), argv)


if __name__ == "__main__":
    main()
