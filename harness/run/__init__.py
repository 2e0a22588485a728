"""The run pipeline: a suite's grid of cells, computed model by model.

``runner`` walks the suite (per model, per method), ``session`` holds what one
model computes once (calibration, factorizations), ``measure`` evaluates one
cell, ``record`` is the typed cell result, ``cells`` the grid and cell
identity, ``calibration`` the calibration statistics.
"""
