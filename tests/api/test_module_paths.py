"""xFormers' public module paths of the seed era resolve under ``triformers``, and the names code imports from
them are there (the same objects as in our own modules, not copies).

The list is typed from the API sheet (xFormers 0.0.24): a module path that code or xFormers' tests import, as
``triformers.<path>`` (``import triformers.as_xformers`` maps ``xformers.<path>`` onto it). Not listed: the
CUDA/C++ operator modules (``ops.fmha.cutlass``, ``flash``, ``small_k``, ``decoder``), which are attributes of
``ops.fmha`` naming our operators, and the private kernel modules of ``xformers.triton`` (``k_*``).
"""

import importlib
import sys

import pytest

MODULES = [
    "checkpoint",
    "components",
    "components.activations",
    "components.attention",
    "components.attention.attention_mask",
    "components.attention.attention_patterns",
    "components.attention.base",
    "components.attention.blocksparse",
    "components.attention.compositional",
    "components.attention.core",
    "components.attention.favor",
    "components.attention.feature_maps",
    "components.attention.fourier_mix",
    "components.attention.global_tokens",
    "components.attention.lambda_layer",
    "components.attention.linformer",
    "components.attention.local",
    "components.attention.nystrom",
    "components.attention.ortho",
    "components.attention.pooling",
    "components.attention.random",
    "components.attention.scaled_dot_product",
    "components.attention.sparsity_config",
    "components.attention.utils",
    "components.attention.visual",
    "components.feedforward",
    "components.in_proj_container",
    "components.multi_head_dispatch",
    "components.patch_embedding",
    "components.positional_embedding",
    "components.residual",
    "components.reversible",
    "components.simplicial_embedding",
    "factory",
    "factory.block_configs",
    "factory.block_factory",
    "factory.hydra_helper",
    "factory.model_factory",
    "factory.weight_init",
    "helpers",
    "helpers.hierarchical_configs",
    "info",
    "ops",
    "ops.common",
    "ops.fmha",
    "ops.fmha.attn_bias",
    "ops.fmha.common",
    "ops.fmha.dispatch",
    "ops.fmha.triton",
    "ops.fmha.triton_splitk",
    "ops.indexing",
    "ops.rmsnorm",
    "ops.rope_padded",
    "ops.swiglu_op",
    "ops.unbind",
    "profiler",
    "sparse",
    "triton",
    "triton.dropout",
    "triton.layer_norm",
    "triton.softmax",
    "utils",
]

# names imported from those paths by code written against xFormers (its tests among it)
NAMES = {
    "": ["_is_triton_available", "checkpoint", "list_operators", "get_optimal_checkpoint_policy",
         "selective_checkpoint_wrapper"],
    "components.attention": ["Attention", "AttentionConfig", "AttentionMask", "ATTENTION_REGISTRY",
                             "build_attention", "register_attention", "maybe_sparsify", "sparsify",
                             "ScaledDotProduct", "LocalAttention", "LinformerAttention", "NystromAttention",
                             "RandomAttention", "OrthoFormerAttention", "GlobalAttention", "FavorAttention",
                             "BlockSparseAttention", "CompositionalAttention", "FourierMix", "LambdaLayer",
                             "Pooling", "Visual"],
    "ops.swiglu_op": ["swiglu", "SwiGLU", "SwiGLUOp", "SwiGLUOpDispatch", "SwiGLUEagerOp", "SwiGLUFusedOp",
                      "SwiGLUPackedFusedOp"],
    "helpers.hierarchical_configs": ["BasicLayerConfig", "get_hierarchical_configuration"],
    "utils": ["Item", "generate_matching_config", "get_registry_decorator"],
    "ops.fmha.common": ["Inputs", "Context", "Gradients", "AttentionFwOpBase", "AttentionBwOpBase",
                        "AttentionOpBase", "check_lastdim_alignment_stride1", "_is_bias_type_supported_in_BMK"],
    "ops.fmha.dispatch": ["_dispatch_fw", "_dispatch_bw", "_dispatch_fw_priority_list",
                          "_ensure_op_supports_or_raise", "AttentionOpDispatch"],
    "ops.common": ["BaseOperator", "register_operator", "OPERATORS_REGISTRY", "InputError"],
}

# a compatibility path and the module whose objects it must hand out
SAME_OBJECTS = {
    "ops.swiglu_op": "ops.swiglu",
    "helpers.hierarchical_configs": "factory.hierarchical_configs",
    "utils": "components._registry",
}


@pytest.mark.parametrize("path", MODULES)
def test_seed_era_module_path_resolves(path):
    importlib.import_module(f"triformers.{path}")


@pytest.mark.parametrize("path", sorted(NAMES))
def test_names_exist(path):
    module = importlib.import_module(f"triformers.{path}" if path else "triformers")
    missing = [name for name in NAMES[path] if not hasattr(module, name)]
    assert not missing, f"triformers.{path} lacks {missing}"


def test_attention_classes_are_reexported_from_their_modules():
    attention = importlib.import_module("triformers.components.attention")
    for name in NAMES["components.attention"]:
        obj = getattr(attention, name)
        if isinstance(obj, type) and obj.__module__ != attention.__name__:
            assert getattr(sys.modules[obj.__module__], name) is obj
    registered = {item.constructor for item in attention.ATTENTION_REGISTRY.values()}
    exported = {getattr(attention, n) for n in NAMES["components.attention"] if isinstance(getattr(attention, n), type)}
    assert registered <= exported, f"registered but not exported: {registered - exported}"


@pytest.mark.parametrize("path", sorted(SAME_OBJECTS))
def test_compatibility_paths_hand_out_our_objects(path):
    alias = importlib.import_module(f"triformers.{path}")
    ours = importlib.import_module(f"triformers.{SAME_OBJECTS[path]}")
    names = getattr(alias, "__all__", None) or NAMES[path]
    assert names
    for name in names:
        assert getattr(alias, name) is getattr(ours, name), name
