"""Models built from configs (random weights) for tests, the demo and the benchmarks.

``transformers_vlms``: the transformers families (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL);
``llava_original``: the original LLaVA code base (llava-torch); ``processors``: their tokenizers and processors.
"""
