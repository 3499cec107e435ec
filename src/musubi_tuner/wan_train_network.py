"""`wan_train_network.py`: train a Wan2.1 LoRA (reference-compatible flags; see docs/training.md)."""

from musubi_tuner.cli import run_cli
from musubi_tuner.training.cli import train_main


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda args: train_main("wan", args), argv)


if __name__ == "__main__":
    main()
