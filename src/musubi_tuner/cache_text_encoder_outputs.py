"""`cache_text_encoder_outputs.py`: HunyuanVideo LLM + CLIP-L caching, the reference's name (no prefix)."""

from musubi_tuner.caching import caching_main
from musubi_tuner.cli import run_cli


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda args: caching_main("hunyuan_video", "cache_text", args), argv)


if __name__ == "__main__":
    main()
