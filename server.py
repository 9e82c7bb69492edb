"""Thin entry point: `python server.py [flags]` is `adapterserve serve [flags]` (see --help)."""
import sys

from adapterserve.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
