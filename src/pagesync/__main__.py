"""`python -m pagesync`: the `pagesync` command."""

from pagesync.warm import main

main()
