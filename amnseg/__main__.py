"""``python -m amnseg`` (and ``torchrun ... -m amnseg``): the command line."""

from amnseg.cli import main

main()
