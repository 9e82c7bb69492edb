"""python -m adapterserve ... is the `adapterserve` console script."""
import sys

from adapterserve.cli import main

sys.exit(main())
