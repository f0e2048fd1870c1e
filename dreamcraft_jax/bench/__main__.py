"""``python -m dreamcraft_jax.bench <bench> ...``: see :mod:`dreamcraft_jax.bench.cli`."""

import sys

from dreamcraft_jax.bench.cli import main

sys.exit(main())
