"""Thin entry point: `python server.py [flags]` is `adapterserve serve [flags]` (see --help)."""
import sys

from adapterserve.runtime.server.app import main

if __name__ == "__main__":
    sys.exit(main())
