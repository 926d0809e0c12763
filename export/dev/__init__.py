"""Development tools, not part of the installed product: builders of random-weight test checkpoints (our own
tiny ones, and ones at the real shapes of published checkpoints) and the demo model's training recipe.

pyproject.toml does not list this package, so a wheel leaves it out; a source checkout installed with
`pip install -e .` (the tests, the benchmarks) imports it as `edgevlm.export.dev`.
"""
