"""`python -m server.bench <name>`: the benchmarks in the repository's `bench/` folder.

Run from the repository root, where `bench` is importable; the extension zip leaves this out.
"""

import sys

from bench import main

if __name__ == "__main__":
    sys.exit(main())
