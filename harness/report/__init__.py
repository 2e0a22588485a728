"""Reports read from a results directory: leaderboard, HTML report, Pareto plots,
paired significance, per-matrix rank report, compare, check (regression baselines)
and show (one cell's provenance). All read cell records (``harness.run.record``).
"""
