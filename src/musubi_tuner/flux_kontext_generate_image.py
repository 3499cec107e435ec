"""`flux_kontext_generate_image.py`: FLUX.1 Kontext image editing / generation (reference-compatible flags)."""

from musubi_tuner.cli import run_cli
from musubi_tuner.inference.generate_cli import generate_main


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda args: generate_main("flux_kontext", args), argv)


if __name__ == "__main__":
    main()
