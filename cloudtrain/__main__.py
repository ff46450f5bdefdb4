"""`python -m cloudtrain` runs the command-line interface."""

from cloudtrain.cli import main

main()
