"""`flux_kontext_train_network.py`: train a FLUX.1 Kontext LoRA (reference flags; see docs/flux_kontext.md)."""

from musubi_tuner.cli import run_cli
from musubi_tuner.training.cli import train_main


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda args: train_main("flux_kontext", args), argv)


if __name__ == "__main__":
    main()
