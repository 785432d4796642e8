"""`python -m deltatune ...` (also what torchrun launches)."""

from deltatune.cli import main

main()
