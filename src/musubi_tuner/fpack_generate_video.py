"""`fpack_generate_video.py`: FramePack / FramePack-F1 image to video and one-frame inference (reference flags)."""

from musubi_tuner.architectures.framepack.generation_session import FramePackSession
from musubi_tuner.cli import run_cli
from musubi_tuner.inference.generate_cli import generate_main


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda args: generate_main("framepack", args, session_type=FramePackSession), argv)


if __name__ == "__main__":
    main()
