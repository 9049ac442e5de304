"""Llama-architecture inference on triformers: paged KV cache, continuous batching, split-K decoding, CUDA graphs.

``model.py`` (the decoder), ``cache.py`` (KV cache layouts and quantization), ``engine.py`` (continuous
batching and CUDA graphs), ``checkpoint.py`` (HuggingFace and Meta weights), ``tokenizer.py``, ``generate.py``
(the command line). See README.md.
"""
