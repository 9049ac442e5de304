"""xFormers' module path for its registry helpers (``xformers.utils``): the very objects of
:mod:`triformers.components._registry`."""

from triformers.components._registry import Item, generate_matching_config, get_registry_decorator

__all__ = ["Item", "generate_matching_config", "get_registry_decorator"]
