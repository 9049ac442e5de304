"""xFormers' ``helpers`` package path: :mod:`triformers.helpers.hierarchical_configs`."""
