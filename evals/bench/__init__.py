"""Prefill benchmarks on realistically shaped models with random weights (``make bench``).

``llava15``: the LLaVA-1.5 case and the timing harness the others share (``vtprune bench``);
``anyres``: LLaVA-NeXT AnyRes crops (``vtprune bench --anyres``); ``video``: LLaVA-OneVision
video with quota (``vtprune bench --video``).
"""
