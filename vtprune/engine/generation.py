"""Where ``generate`` itself must learn that a cache was pruned, and how expanded batches map back.

1. A returned cache continued by a second ``generate``: ``generate`` slices the new input ids by
   ``cache.get_seq_length()``, which counts the *pruned* prompt, so it would feed already-cached
   tokens again. :func:`continued_cache_patch` wraps the instance's
   ``prepare_inputs_for_generation`` and, on the first iteration over a cache vtprune pruned,
   moves the slice by the tokens the cut removed (the unpruned model's rule: every token the
   cache stands for is consumed once).
2. Expansion (beam search, ``num_return_sequences``): ``generate`` encodes the images once and
   repeats each sample's group of encoded images for its expanded rows ([A, B] -> [A, B, A, B],
   ``GenerationMixin._expand_multimodal_outputs``). :func:`expanded_image_index` says, for each
   image of the expanded prefill, which encoded image it repeats, so per-image facts gathered
   when the images were encoded (scores, packing maps, grids) follow the same rule.
"""

from __future__ import annotations

from collections.abc import Callable


def continued_cache_patch(model, removed_tokens: Callable[[object], int]):
    """``InstanceMethodPatch`` of ``model.prepare_inputs_for_generation``.

    removed_tokens(cache) -> how many fewer entries ``cache`` holds than the unpruned prompt
    would (0 for a cache vtprune did not prune).
    """
    from vtprune.patches import InstanceMethodPatch

    def make_wrapper(prepare):
        def prepare_inputs_for_generation(input_ids, *args, next_sequence_length=None, **kwargs):
            cache = kwargs.get("cache")
            if next_sequence_length is not None and kwargs.get("is_first_iteration") and cache is not None:
                removed = removed_tokens(cache)
                if removed:  # generate sliced by the pruned length: the cut tokens were consumed too
                    next_sequence_length -= removed
                    if next_sequence_length < 1:
                        raise ValueError(
                            "generate was given a cache vtprune pruned and no new tokens; pass the sequences the "
                            "first generate returned (prompt + generated tokens) as input_ids"
                        )
            return prepare(input_ids, *args, next_sequence_length=next_sequence_length, **kwargs)

        return prepare_inputs_for_generation

    return InstanceMethodPatch(model, "prepare_inputs_for_generation", make_wrapper)


def expanded_image_index(row_image_tokens: list[int], encoded_image_tokens: list[int]) -> list[int]:
    """For each image of an expanded prefill (in order), the index of the encoded image it repeats.

    row_image_tokens: image placeholder columns per row of the prefill (B * E rows, each sample's
    E expanded rows consecutive, as ``repeat_interleave`` leaves them); encoded_image_tokens:
    placeholder columns of each encoded image (n images, in the unexpanded order). With E = 1
    this is ``range(n)``.
    """
    expected = sum(row_image_tokens)
    encoded = sum(encoded_image_tokens)
    if encoded == 0 or expected % encoded:
        raise ValueError(
            f"the prompt has {expected} image placeholders but the encoded images fill {encoded}; "
            "encode the images of this very batch"
        )
    expand = expected // encoded
    index, next_image = [], 0
    for sample in range(len(row_image_tokens) // expand):
        want, group = row_image_tokens[sample * expand], []
        while want > 0:
            if next_image >= len(encoded_image_tokens):
                raise ValueError("the prompt's image placeholders do not line up with the encoded images")
            group.append(next_image)
            want -= encoded_image_tokens[next_image]
            next_image += 1
        if want:
            raise ValueError("the prompt's image placeholders do not line up with the encoded images")
        index.extend(group * expand)
    return index
