"""`wan_generate_video.py`: Wan2.1 T2V / I2V / FLF2V generation (reference-compatible flags)."""

from musubi_tuner.cli import run_cli
from musubi_tuner.inference.generate_cli import generate_main


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda args: generate_main("wan", args), argv)


if __name__ == "__main__":
    main()
