"""``python -m star_lightning`` is the same as ``star-lightning``."""

from star_lightning.cli import console_main

if __name__ == "__main__":
    console_main()
