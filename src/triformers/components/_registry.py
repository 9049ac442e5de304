"""Registries of named components, each tied to a config dataclass (xFormers' ``xformers.utils``).

A registry maps a name to an :class:`Item` ``(constructor, config)``. ``register_*`` decorators fill it;
``build_*`` functions turn a plain dict into a typed config (fields the config does not declare are
dropped, missing ones become None) and call ``constructor.from_config`` (None fields are left out, so the
constructor's defaults apply). Registries are filled by the explicit imports of each package's
``__init__``: a new component is one module plus one import line.
"""

from __future__ import annotations

import dataclasses
from collections import namedtuple
from collections.abc import Callable, Mapping
from typing import Any

Item = namedtuple("Item", ["constructor", "config"])


def get_registry_decorator(
    class_registry: dict[str, Item], name_registry: set[str], reference_class: type, default_config: Any
) -> Callable[..., Callable[[type], type]]:
    """Make a ``register_x(name, config=default_config)`` class decorator filling ``class_registry``.

    Args:
        class_registry: name -> Item(constructor, config), filled by the decorator.
        name_registry: class names already registered (two classes of one name would be ambiguous).
        reference_class: base class every registered class must extend.
        default_config: config dataclass used when the decorator is given none.

    Returns:
        The decorator factory.
    """

    def register_item(name: str, config: Any = default_config) -> Callable[[type], type]:
        if not isinstance(name, str) or not name:
            raise ValueError(
                f"a registered {reference_class.__name__} needs a non-empty string name, got {name!r}"
            )
        if config is not None and not dataclasses.is_dataclass(config):
            raise ValueError(
                f"register {name!r}: config={config!r} is not a dataclass; declare it with @dataclass "
                f"(usually a subclass of {getattr(default_config, '__name__', 'the base config')})"
            )

        def register_cls(cls: type) -> type:
            if name in class_registry:
                existing = class_registry[name].constructor
                raise ValueError(
                    f"Cannot register duplicate item: {name!r} is already registered by "
                    f"{existing.__module__}.{existing.__qualname__}; pick another name for {cls.__qualname__}"
                )
            if not (isinstance(cls, type) and issubclass(cls, reference_class)):
                raise ValueError(
                    f"Item {name!r} ({getattr(cls, '__qualname__', cls)!r}) must extend the base class "
                    f"{reference_class.__module__}.{reference_class.__qualname__}"
                )
            if cls.__name__ in name_registry:
                raise ValueError(
                    f"Cannot register {name!r}: a class named {cls.__name__!r} is already registered under "
                    "another "
                    "name; rename the class"
                )
            class_registry[name] = Item(constructor=cls, config=config)
            name_registry.add(cls.__name__)
            return cls

        return register_cls

    return register_item


def generate_matching_config(superset: Mapping[str, Any], config_class: type) -> Any:
    """Build ``config_class`` from the fields of ``superset`` it declares; missing fields become None."""
    if dataclasses.is_dataclass(superset) and not isinstance(superset, type):
        superset = {f.name: getattr(superset, f.name) for f in dataclasses.fields(superset)}
    names = [f.name for f in dataclasses.fields(config_class) if f.init]
    return config_class(**{k: superset.get(k, None) for k in names})


def config_to_kwargs(config: Any) -> dict[str, Any]:
    """The non-None fields of a config dataclass, shallow (modules and tensors are passed, not copied)."""
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if getattr(config, f.name) is not None
    }


def build_from_registry(config: Any, registry: dict[str, Item], kind: str) -> Any:
    """Look ``config['name']`` up in ``registry`` and build it (shared body of the ``build_*`` functions)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    if not isinstance(config, Mapping):
        raise TypeError(
            f"build_{kind} expects a dict or a config dataclass with a 'name', got {type(config).__name__}"
        )
    name = config.get("name")
    if name not in registry:
        known = ", ".join(sorted(registry)) or "(none)"
        raise KeyError(
            f"{kind} {name!r} is not registered (known: {known}); register it with @register_{kind}(name, "
            "Config) "
            f"and import its module from the package __init__"
        )
    item = registry[name]
    typed = generate_matching_config(config, item.config)
    return item.constructor.from_config(typed)
