"""Per-forward state: threads sharing one patched model, accelerate's hooks, chunked prefill, static caches.

The references are the same model run alone (one thread, no offload, one prefill), so what is
tested is that the state vtprune keeps between the vision tower, the prefill and the decode
steps reaches the right forward.
"""

import threading

import accelerate
import pytest
import torch
from helpers import clip_images, prompt_ids

import vtprune
from vtprune.evals.models.transformers_vlms import tiny_llava

N = 16  # visual tokens per image of the tiny model


def prompt(text=(4, 6), seed=0):
    return prompt_ids(list(text), num_images=1, seed=seed).unsqueeze(0)


def generate(model, ids, px, **options):
    with torch.no_grad():
        return model.generate(input_ids=ids, pixel_values=px, max_new_tokens=6, do_sample=False, **options)


def kept(handle):
    return [k.tolist() for k in handle.last.stages[0].kept]


@pytest.mark.parametrize("spec", ["fastervlm:keep_tokens=4", "fopru:keep_tokens=5", "fastv:k=1,keep_tokens=3"])
def test_two_threads_generating_on_one_model_get_their_own_answers(spec):
    model = tiny_llava(seed=1)
    cases = [(prompt((4, 6), seed=s), clip_images(1, seed=10 + s)) for s in range(4)]
    with vtprune.patched(model, spec):
        alone = [generate(model, ids, px) for ids, px in cases]
        results, errors = {}, []
        start = threading.Barrier(2)

        def run(indices):
            try:
                start.wait()
                for _ in range(3):  # interleave many forwards of the two threads
                    for i in indices:
                        results.setdefault(i, []).append(generate(model, *cases[i]))
            except Exception as error:  # noqa: BLE001 (reported below)
                errors.append(error)

        threads = [threading.Thread(target=run, args=(part,)) for part in ([0, 1], [2, 3])]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors
    for i, expected in enumerate(alone):
        assert all(torch.equal(output, expected) for output in results[i])


@pytest.mark.parametrize("spec", ["fastervlm:keep_tokens=4", "fopru:keep_tokens=5"])
def test_accelerate_cpu_offload_keeps_the_same_tokens_and_generation(spec):
    ids, px = prompt(seed=3), clip_images(1, seed=3)
    reference = tiny_llava(seed=2)
    with vtprune.patched(reference, spec) as handle:
        expected, expected_kept = generate(reference, ids, px), kept(handle)
    offloaded = accelerate.cpu_offload(tiny_llava(seed=2), execution_device="cpu")
    with vtprune.patched(offloaded, spec) as handle:
        assert torch.equal(generate(offloaded, ids, px), expected)
        assert kept(handle) == expected_kept


def test_a_static_cache_is_refused_at_the_prefill_naming_it():
    model = tiny_llava(seed=1)
    refusal = pytest.raises(NotImplementedError, match="static caches.*StaticCache.*default dynamic cache")
    with vtprune.patched(model, "fastervlm", keep_tokens=4), refusal:
        generate(model, prompt(), clip_images(1), cache_implementation="static")


def test_a_text_only_forward_between_prefills_does_not_carry_scores_over():
    """Scores belong to the encoding of the same thread's next prefill; a text forward in between drops them."""
    model = tiny_llava(seed=1)
    ids, px = prompt(seed=5), clip_images(1, seed=5)
    with vtprune.patched(model, "fastervlm", keep_tokens=4) as handle, torch.no_grad():
        encoded = model.model.get_image_features(pixel_values=px)
        model(input_ids=torch.tensor([[5, 6, 7]]))
        with pytest.raises(RuntimeError, match="encoded where vtprune did not see it"):
            model(input_ids=ids, mm_encoder_outputs={"image": encoded})
        assert handle.last.stages == []  # the text-only prompt's record


def test_chunked_prefill_is_refused_before_generating():
    model = tiny_llava(seed=1)
    refusal = pytest.raises(NotImplementedError, match=r"prefill_chunk_size=8.*Leave prefill_chunk_size unset")
    with vtprune.patched(model, "fastervlm", keep_tokens=4), refusal:
        generate(model, prompt(), clip_images(1), prefill_chunk_size=8)
    assert (
        generate(model, prompt(), clip_images(1), prefill_chunk_size=8).shape[1] == prompt().shape[1] + 6
    )  # unpatched
