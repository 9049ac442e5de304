"""xFormers' module path for hierarchical model configs (``xformers.helpers.hierarchical_configs``): the very
objects of :mod:`triformers.factory.hierarchical_configs`."""

from triformers.factory.hierarchical_configs import BasicLayerConfig, get_hierarchical_configuration

__all__ = ["BasicLayerConfig", "get_hierarchical_configuration"]
