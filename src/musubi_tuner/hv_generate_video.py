"""`hv_generate_video.py`: HunyuanVideo T2V, video to video and SkyReels V1 I2V generation (reference flags)."""

from musubi_tuner.cli import run_cli
from musubi_tuner.inference.generate_cli import generate_main


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda args: generate_main("hunyuan_video", args), argv)


if __name__ == "__main__":
    main()
