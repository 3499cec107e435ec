"""`cache_latents.py`: HunyuanVideo latent caching, the reference's name (its first architecture had no prefix)."""

from musubi_tuner.caching import caching_main
from musubi_tuner.cli import run_cli


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda args: caching_main("hunyuan_video", "cache_latents", args), argv)


if __name__ == "__main__":
    main()
