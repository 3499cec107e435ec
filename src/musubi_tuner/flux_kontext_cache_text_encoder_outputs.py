"""`flux_kontext_cache_text_encoder_outputs.py`: reference-compatible entry point (thin: parse, then call the driver)."""

from musubi_tuner.caching import caching_main
from musubi_tuner.cli import run_cli


def main(argv: list[str] | None = None) -> None:
    run_cli(lambda args: caching_main("flux_kontext", "cache_text", args), argv)


if __name__ == "__main__":
    main()
