"""Preloaded by the multiprocessing fork server only (see `pool.GradingPool`); never import it
elsewhere. Importing it warms up sympy and math-verify, so every worker forked from the fork
server starts warm."""

import contextlib

from puremesh.services.verify.worker import warm_up

# The fork server survives only ImportError from a preloaded module; a failed warm-up must not
# take it down (each worker warms up again anyway).
with contextlib.suppress(Exception):
    warm_up()
