"""`fpack_cache_text_encoder_outputs.py`: FramePack LLM + CLIP-L caching (HunyuanVideo's encoders; docs/framepack.md)."""

from musubi_tuner.caching import caching_main
from musubi_tuner.cli import run_cli


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda args: caching_main("framepack", "cache_text", args), argv)


if __name__ == "__main__":
    main()
