"""The contract matrix: every supported family x every registered method x generate's modes.

Contracts (design notes, "Contracts tests and users rely on"):
- keep-all gives bit-identical logits and generations, against the unpatched model;
- ``remove()`` restores bit-identical behaviour and leaves no hooks, instance attributes or
  instance methods behind;
- batch invariance: a left-padded batch keeps, for each sample, the tokens that sample keeps alone
  and generates what it generates alone;
- cached decode equals the cache-free reference on the same kept set;
- generate's surface works patched (sampling, beams, several return sequences, a continued cache,
  ``use_cache=False``, labels, two threads on one model; a static cache is refused naming it), each
  against an independent expectation;
- ``handle.last.kv_cache_bytes`` is what the returned cache holds.

The cases live in tests/contract_cases.py. A refusal at patch time (a method that does not apply to
a family) is a skip carrying the refusal. Failures not fixed yet are strict xfails listed in ``FOUND``.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import types

import pytest
import torch
from conftest import hook_counts
from contract_cases import FAMILIES, METHODS, FamilyCase

import vtprune
import vtprune.patches

STEPS = 3  # new tokens per generate
MODES = [
    "sampling",
    "beams",
    "num_return_sequences",
    "continued_cache",
    "no_cache",
    "labels",
    "threads",
    "static_cache",
]
POSITIONS = ["compact", "original"]  # the positions kept tokens take (every method has the option)

IN_LLM = ["fastv", "pdrop"]

# Failures this matrix found that are not fixed yet: (tests, families, methods, reason), strict xfails.
FOUND = [
    (
        ["mode[no_cache]"],
        ["llava_original"],
        IN_LLM,
        "FOUND: llava_original generate(use_cache=False) with an in-LLM method is not a fresh prefill per step (its "
        "tokens equal the cached generate's, not a loop of cache-free forwards)",
    ),
]


def marks_for(test: str, family: str, method: str) -> list:
    return [
        pytest.mark.xfail(strict=True, reason=reason)
        for tests, families, methods, reason in FOUND
        if test in tests and family in families and method in methods
    ]


def legacy_transformers() -> bool:
    from transformers import __version__

    return int(__version__.split(".")[0]) < 5


def cases(test: str, variants: list[str] | None = None) -> list:
    """(family, method[, variant]) parameters of ``test``, with the xfail marks of ``FOUND``
    (keyed ``test`` or ``test[variant]``)."""
    params = []
    for family in FAMILIES:
        for method in METHODS:
            for variant in variants or [None]:
                marks = marks_for(f"{test}[{variant}]" if variant else test, family, method)
                values = (family, method, variant) if variant else (family, method)
                params.append(pytest.param(*values, marks=marks, id="-".join(values)))
    return params


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on tiny models two threads are several times slower on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def family_cases():
    """One model per family for the whole module (built on first use): tests patch it and remove."""
    built: dict[str, FamilyCase] = {}

    def get(name: str) -> FamilyCase:
        if name not in built:
            if name == "llava_original":
                pytest.importorskip("llava.model", reason="the original LLaVA package (llava-torch) is not installed")
            elif legacy_transformers():
                pytest.skip(f"{name}'s tiny model needs transformers 5 (this is llava-torch's era)")
            built[name] = FAMILIES[name]()
            built[name].family = name
        return built[name]

    return get


@contextlib.contextmanager
def patched(case: FamilyCase, method: str, budget: str, **extra):
    """``vtprune.patched`` at the method case's ``budget`` ("small" or "keep_all"), plus ``extra``
    options; a refusal at patch time is a skip carrying its message."""
    options = {**getattr(METHODS[method], budget), **extra}
    no_keep_all = METHODS[method].no_keep_all.get(case.family)
    if budget == "keep_all" and no_keep_all:
        pytest.skip(f"{method} has no keep-all configuration on {case.family}: {no_keep_all}")
    try:
        handle = vtprune.patch(case.model, method, **options)
    except (ValueError, TypeError, NotImplementedError) as error:
        pytest.skip(f"{method} refused at patch time: {error}")
    try:
        yield handle
    finally:
        handle.remove()


def unpatched(case: FamilyCase, key: str, compute):
    """A reference output of the unpatched model, computed once per family."""
    assert vtprune.get_handle(case.model) is None
    if key not in case.memo:
        case.memo[key] = compute()
    return case.memo[key]


def greedy(case: FamilyCase, inputs: dict, steps: int = STEPS, **options) -> torch.Tensor:
    """New tokens of a greedy generate."""
    out = case.generate(inputs, max_new_tokens=steps, do_sample=False, **options)
    return case.new_tokens(out, inputs, steps)


def fresh_greedy(case: FamilyCase, inputs: dict, steps: int = STEPS, on_step=None) -> torch.Tensor:
    """Greedy decoding without a cache: every step re-runs the whole prompt and the tokens so far
    (for a patched model: a fresh prefill each step). ``on_step(step, logits)`` sees each step."""
    tokens = inputs["input_ids"][:, :0]
    for step in range(steps):
        logits = case.forward(case.extend(inputs, tokens), use_cache=False).logits[:, -1]
        if on_step is not None:
            on_step(step, logits)
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens


def reference_greedy(case: FamilyCase, inputs: dict, **options) -> torch.Tensor:
    """The unpatched model's greedy tokens (a cache-free loop where it cannot generate)."""
    if case.no_unpatched_generate:
        return fresh_greedy(case, inputs)
    return greedy(case, inputs, **options)


def kept_sets(handle) -> list[list[torch.Tensor]]:
    return [stage.kept for stage in handle.last.stages]


def assert_prunes(handle):
    record = handle.last
    assert sum(record.visual_tokens_kept) < sum(record.visual_tokens_in), "the small budget must prune"


def instance_state(model: torch.nn.Module) -> dict:
    """Every module's instance attributes by name, and the identity of those that are callables."""
    state = {}
    for path, module in model.named_modules():
        for name, value in vars(module).items():
            is_callable = isinstance(value, types.MethodType | types.FunctionType) or (
                callable(value) and not isinstance(value, torch.nn.Module | torch.Tensor | type)
            )
            state[(path, name)] = id(value) if is_callable else None
    return state


# -- the tables cover every family and method --------------------------------------------------


def test_every_supported_family_and_registered_method_has_a_case():
    assert set(vtprune.patches.supported_families()) == set(FAMILIES)
    assert set(vtprune.methods()) == set(METHODS)


# -- keep-all and remove() ---------------------------------------------------------------------


@pytest.mark.parametrize("family, method", cases("keep_all"))
def test_keep_all_is_bit_identical(family_cases, family, method):
    case = family_cases(family)
    reference_logits = unpatched(case, "logits", lambda: case.forward(case.batch).logits)
    reference_tokens = unpatched(case, "greedy", lambda: reference_greedy(case, case.batch))
    with patched(case, method, "keep_all") as handle:
        logits = case.forward(case.batch).logits
        tokens = greedy(case, case.batch)
        record = handle.last
    assert record.visual_tokens_kept == record.visual_tokens_in
    assert torch.equal(logits, reference_logits)
    assert torch.equal(tokens, reference_tokens)


@pytest.mark.parametrize("family, method", cases("remove"))
def test_remove_restores_the_model_exactly(family_cases, family, method):
    case = family_cases(family)
    reference_logits = unpatched(case, "logits", lambda: case.forward(case.batch).logits)
    reference_tokens = unpatched(case, "greedy", lambda: reference_greedy(case, case.batch))
    hooks, state = hook_counts(case.model), instance_state(case.model)  # after a first forward (lazy hooks)
    with patched(case, method, "small") as handle:
        greedy(case, case.batch)
        assert_prunes(handle)
    assert hook_counts(case.model) == hooks
    assert instance_state(case.model) == state
    assert torch.equal(case.forward(case.batch).logits, reference_logits)
    assert torch.equal(reference_greedy(case, case.batch), reference_tokens)


# -- batches and the cache -----------------------------------------------------------------------


@pytest.mark.parametrize("family, method, positions", cases("batch_invariance", POSITIONS))
def test_left_padded_batch_equals_each_sample_alone(family_cases, family, method, positions):
    case = family_cases(family)
    with patched(case, method, "small", positions=positions) as handle:
        batch_tokens = greedy(case, case.batch)
        assert_prunes(handle)
        batch_kept = kept_sets(handle)
        for row, sample in enumerate(case.samples):
            alone = greedy(case, sample)
            alone_kept = kept_sets(handle)
            assert len(alone_kept) == len(batch_kept)
            for stage, (kept, batch_stage) in enumerate(zip(alone_kept, batch_kept, strict=True)):
                assert torch.equal(kept[0], batch_stage[row]), f"stage {stage}, sample {row}"
            assert torch.equal(alone[0], batch_tokens[row]), f"sample {row}"


@pytest.mark.parametrize("family, method, positions", cases("cached_decode", POSITIONS))
def test_cached_decode_equals_the_cache_free_reference(family_cases, family, method, positions):
    """Each decode step's logits (pruned cache) equal a fresh prefill of the prompt and the tokens so
    far, checked to keep the same set (pre-LLM selections do not depend on the text that follows)."""
    if vtprune.methods()[method]["stage"] == "in_llm":
        pytest.skip(
            "an in-LLM selection reads the last token's attention, so a fresh prefill re-selects; "
            "layer-by-layer references cover it (test_in_llm.py, test_qwen2_vl.py)"
        )
    case = family_cases(family)
    with patched(case, method, "small", positions=positions) as handle:
        out = case.generate(
            case.batch, max_new_tokens=STEPS, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        assert_prunes(handle)
        prefill_kept = kept_sets(handle)
        step_logits = torch.stack(out.logits, dim=1)  # (B, STEPS, V)

        def check(step, logits):
            for kept, expected in zip(kept_sets(handle), prefill_kept, strict=True):
                assert all(torch.equal(a, b) for a, b in zip(kept, expected, strict=True)), f"step {step}: kept set"
            torch.testing.assert_close(logits, step_logits[:, step], rtol=1e-4, atol=1e-4)

        tokens = fresh_greedy(case, case.batch, on_step=check)
    assert torch.equal(tokens, case.new_tokens(out.sequences, case.batch, STEPS))


# -- generate's modes ------------------------------------------------------------------------------


def mode_sampling(case, method, handle_for):
    """A fixed seed: keep-all equals the unpatched model; top_k=1 sampling equals greedy decoding."""
    options = {"max_new_tokens": STEPS, "do_sample": True, "top_k": 0}

    def sample():
        torch.manual_seed(7)
        return case.new_tokens(case.generate(case.batch, **options), case.batch, STEPS)

    with handle_for("small") as handle:
        greedy_tokens = greedy(case, case.batch)
        torch.manual_seed(7)
        top_1 = case.generate(case.batch, max_new_tokens=STEPS, do_sample=True, top_k=1)
        assert_prunes(handle)
    assert torch.equal(case.new_tokens(top_1, case.batch, STEPS), greedy_tokens)
    if case.no_unpatched_generate:
        pytest.skip(case.no_unpatched_generate)
    reference = unpatched(case, "sampling", sample)
    with handle_for("keep_all"):
        assert torch.equal(sample(), reference)


def expanded_rows(handle_for, case, **options):
    """generate with rows expanded (beams / return sequences): each row keeps its source sample's set."""
    with handle_for("small") as handle:
        greedy_tokens = greedy(case, case.batch)
        source_kept = kept_sets(handle)
        source_counts = handle.last.visual_tokens_kept
        sequences = case.generate(case.batch, max_new_tokens=STEPS, **options)
        assert_prunes(handle)
        counts = handle.last.visual_tokens_kept
        expanded = kept_sets(handle)
    copies = len(counts) // len(source_counts)  # the prefill runs on the expanded rows
    assert copies == 2
    assert counts == [n for n in source_counts for _ in range(copies)]
    for kept, source in zip(expanded, source_kept, strict=True):
        for row, rows_kept in enumerate(kept):
            assert torch.equal(rows_kept, source[row // copies]), f"expanded row {row}"
    return greedy_tokens, sequences


def mode_beams(case, method, handle_for):
    options = {"num_beams": 2, "do_sample": False}
    expanded_rows(handle_for, case, **options)
    if case.no_unpatched_generate:
        pytest.skip(case.no_unpatched_generate)
    reference = unpatched(case, "beams", lambda: case.generate(case.batch, max_new_tokens=STEPS, **options))
    with handle_for("keep_all"):
        assert torch.equal(case.generate(case.batch, max_new_tokens=STEPS, **options), reference)


def mode_num_return_sequences(case, method, handle_for):
    """Two sampled sequences per prompt; with top_k=1 both equal the greedy tokens of their prompt."""
    greedy_tokens, sequences = expanded_rows(handle_for, case, num_return_sequences=2, do_sample=True, top_k=1)
    assert torch.equal(case.new_tokens(sequences, case.batch, STEPS), greedy_tokens.repeat_interleave(2, dim=0))
    if case.no_unpatched_generate:
        pytest.skip(case.no_unpatched_generate)
    options = {"max_new_tokens": STEPS, "do_sample": True, "top_k": 0, "num_return_sequences": 2}

    def sample():
        torch.manual_seed(11)
        return case.generate(case.batch, **options)

    reference = unpatched(case, "num_return_sequences", sample)
    with handle_for("keep_all"):
        assert torch.equal(sample(), reference)


def mode_continued_cache(case, method, handle_for):
    """generate, then a second generate that continues the returned cache = one longer generate
    (as for the unpatched model)."""
    if case.no_continued_cache:
        pytest.skip(case.no_continued_cache)

    def continued():
        first = case.generate(case.batch, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        follow = case.extend(case.text_only(case.batch), case.new_tokens(first.sequences, case.batch, 2))
        second = case.generate(follow, max_new_tokens=STEPS - 1, do_sample=False, cache=first.cache)
        return case.new_tokens(second, case.batch, STEPS + 1)

    reference = unpatched(case, "greedy_longer", lambda: greedy(case, case.batch, STEPS + 1))
    assert torch.equal(unpatched(case, "continued", continued), reference)  # the unpatched model continues
    for budget in ("keep_all", "small"):
        with handle_for(budget):
            longer = greedy(case, case.batch, STEPS + 1)
            assert torch.equal(continued(), longer), budget
        if budget == "keep_all":
            assert torch.equal(longer, reference)


def mode_no_cache(case, method, handle_for):
    """use_cache=False: each forward is a fresh prefill, as a loop of cache-free forwards."""
    with handle_for("small") as handle:
        tokens = greedy(case, case.batch, use_cache=False)
        assert_prunes(handle)
        assert torch.equal(tokens, fresh_greedy(case, case.batch))
    reference = unpatched(case, "greedy_no_cache", lambda: reference_greedy(case, case.batch, use_cache=False))
    with handle_for("keep_all"):
        assert torch.equal(greedy(case, case.batch, use_cache=False), reference)


def mode_labels(case, method, handle_for):
    """The loss of the left-padded batch: keep-all equals the unpatched loss; pruned, it equals the
    next-token loss over each row's kept columns (labels cut by hand from the kept set)."""
    inputs = {**case.batch, "labels": case.labels(case.batch)}
    with handle_for("small") as handle:
        out = case.forward(inputs)
        assert_prunes(handle)
        kept = handle.last.stages[-1].kept
    assert torch.isfinite(out.loss)
    if case.returns_prompt:  # the transformers families: input columns are the model's columns
        torch.testing.assert_close(out.loss, hand_cut_loss(case, inputs, out.logits, kept), rtol=1e-5, atol=1e-6)
    reference = unpatched(case, "loss", lambda: case.forward(inputs).loss)
    with handle_for("keep_all"):
        assert torch.equal(case.forward(inputs).loss, reference)


def mode_threads(case, method, handle_for):
    """Two threads generating on one patched model at once: each gets what its prompt gets alone."""
    with handle_for("small"):
        alone = [greedy(case, sample) for sample in case.samples]
        start = threading.Barrier(len(case.samples))
        results, errors = {}, []

        def run(row):
            try:
                start.wait()
                results[row] = [greedy(case, case.samples[row]) for _ in range(2)]
            except Exception as error:  # noqa: BLE001 (re-raised below, in the test's thread)
                errors.append(error)

        threads = [threading.Thread(target=run, args=(row,)) for row in range(len(case.samples))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
    for row, tokens in enumerate(alone):
        assert all(torch.equal(got, tokens) for got in results[row]), f"sample {row}"


def mode_static_cache(case, method, handle_for):
    """A static cache is refused with an error that names it."""
    with handle_for("small"), pytest.raises((ValueError, NotImplementedError, TypeError), match="(?i)static"):
        greedy(case, case.batch, cache_implementation="static")


def hand_cut_loss(case, inputs, logits, kept) -> torch.Tensor:
    """Next-token cross entropy over each row's real columns that survive (text + kept visual)."""
    ids, mask, labels = inputs["input_ids"], inputs["attention_mask"].bool(), inputs["labels"]
    visual = torch.isin(ids, torch.tensor(case.visual_ids))
    total, count = 0.0, 0
    for row in range(ids.shape[0]):
        keep = mask[row] & ~visual[row]
        keep[visual[row].nonzero().flatten()[kept[row]]] = True
        targets = labels[row, keep][1:]
        row_logits = logits[row, -int(keep.sum()) :][:-1]  # left padding: the real columns end the row
        total = total + torch.nn.functional.cross_entropy(row_logits, targets, ignore_index=-100, reduction="sum")
        count += int((targets != -100).sum())
    return total / count


@pytest.mark.parametrize("family, method, mode", cases("mode", MODES))
def test_generate_mode(family_cases, family, method, mode):
    case = family_cases(family)

    def handle_for(budget: str):
        return patched(case, method, budget)

    globals()[f"mode_{mode}"](case, method, handle_for)


# -- introspection -----------------------------------------------------------------------------------


def cache_bytes(cache) -> int:
    layers = cache.layers if hasattr(cache, "layers") else cache  # DynamicCache, or the 4.3x tuples
    tensors = [t for layer in layers for t in ((layer.keys, layer.values) if hasattr(layer, "keys") else layer)]
    return sum(t.numel() * t.element_size() for t in tensors)


def returned_cache(out):
    return out.cache if hasattr(out, "cache") else out.past_key_values


@pytest.mark.parametrize("family, method", cases("kv_cache_bytes"))
def test_kv_cache_bytes_are_the_bytes_of_the_cache(family_cases, family, method):
    case = family_cases(family)
    sample = case.samples[0]  # alone: no padding columns in the cache
    unpruned = unpatched(case, "cache_bytes", lambda: cache_bytes(returned_cache(case.forward(sample, use_cache=True))))
    with patched(case, method, "small") as handle:
        pruned = cache_bytes(returned_cache(case.forward(sample, use_cache=True)))
        record = handle.last
    assert record.kv_cache_bytes == (unpruned, pruned)


# -- the family list is there before any model is patched ------------------------------------------


def test_supported_families_are_listed_before_any_patch():
    code = "import vtprune.patches as p; print(sorted(p.supported_families()))"
    listed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert listed.strip() == str(sorted(FAMILIES))
