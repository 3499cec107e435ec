"""`fpack_train_network.py`: train a FramePack / F1 / one-frame LoRA (reference-compatible flags; docs/framepack.md)."""

from musubi_tuner.cli import run_cli
from musubi_tuner.training.cli import train_main


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda args: train_main("framepack", args), argv)


if __name__ == "__main__":
    main()
