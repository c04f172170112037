"""hpd's benchmarks, each a module run from the repository root: `python -m benchmarks.NAME
--help` says what it measures. `_common` holds what they share; tests import them as
`benchmarks.NAME`, and they import test helpers as `tests.NAME`."""
