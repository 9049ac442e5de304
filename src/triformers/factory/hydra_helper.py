"""Register every component's config dataclass as a Hydra structured-config schema.

After :func:`import_xformer_config_schema`, YAML files can start from a schema, e.g.
``defaults: [/xformers/attention/favor_schema@_here_]``. The group root stays ``xformers`` so
configurations written for xFormers load unchanged.
"""

from __future__ import annotations

import logging

from triformers.components.attention import ATTENTION_REGISTRY
from triformers.components.feedforward import FEEDFORWARD_REGISTRY
from triformers.components.positional_embedding import POSITION_EMBEDDING_REGISTRY

logger = logging.getLogger(__name__)


def import_xformer_config_schema() -> list[str]:
    """Store ``<name>_schema`` under ``xformers/attention``, ``xformers/ff`` and ``xformers/pe``.

    Best effort: configs with field types OmegaConf cannot represent (tensors, modules, callables) are
    skipped. Returns the stored ``group/name`` entries.

    Raises:
        ImportError: if hydra-core is not installed (``pip install hydra-core``).
    """
    try:
        from hydra.core.config_store import ConfigStore
    except ImportError as e:
        raise ImportError("the Hydra schemas need hydra-core: pip install 'hydra-core>=1.1'") from e
    from omegaconf.errors import OmegaConfBaseException

    cs = ConfigStore.instance()
    stored = []
    for group, registry in {
        "ff": FEEDFORWARD_REGISTRY,
        "pe": POSITION_EMBEDDING_REGISTRY,
        "attention": ATTENTION_REGISTRY,
    }.items():
        for name, item in registry.items():
            try:
                cs.store(name=f"{name}_schema", node=item.config, group=f"xformers/{group}")
                stored.append(f"xformers/{group}/{name}_schema")
            except (OmegaConfBaseException, ValueError) as e:
                logger.debug("not registering %s_schema: %s", name, e)
    return stored
