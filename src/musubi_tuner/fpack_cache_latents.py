"""`fpack_cache_latents.py`: FramePack latent caching, one cache per section (`--f1`, `--one_frame`; docs/framepack.md)."""

from musubi_tuner.caching import caching_main
from musubi_tuner.cli import run_cli


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda args: caching_main("framepack", "cache_latents", args), argv)


if __name__ == "__main__":
    main()
