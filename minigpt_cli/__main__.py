"""Allow `python -m minigpt_cli` as well as the `minigpt` console script."""

from minigpt_cli.cli import main

main()
