"""What a ``vtprune`` entry of a served model's config asks for, validated at start-up (no vLLM import).

``hf_overrides={"vtprune": SPEC}`` puts SPEC on the model's Hugging Face config; SPEC is anything
``vtprune.patch`` accepts as its method (a name, a preset, a spec string such as
``"fastervlm:keep_tokens=58"``, a dict), parsed by the same code, so an unknown method, preset or
option fails with the message ``patch`` gives. :func:`serving_plan` then refuses, with the reason,
what vLLM cannot run:

- in-LLM methods (fastv, pdrop: tokens dropped between decoder layers): vLLM lays out the KV cache of
  every layer from one slot mapping per step, so a layer cannot hold fewer tokens than the prompt;
- methods whose kept count is not a function of the image size (content-adaptive budgets): vLLM sizes
  each image's placeholders in the front end before the vision tower runs;
- methods whose selection reads the prompt (query-aware: quota, cdpruner): vLLM caches encoder outputs
  by image hash and reuses them for any prompt;
- family-level mismatches (a tower other than CLIP, a probe layer vLLM does not build, a multi-crop
  method on single-resolution images, a budget larger than an image).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.config import build_methods
from vtprune.methods.base import Method
from vtprune.types import VisualLayout

CONFIG_KEY = "vtprune"
SERVED_PROBES = ("cls", "received")  # the probes vtprune.integrations.vllm.scores computes

IN_LLM_REASON = (
    "it drops tokens between decoder layers, and vLLM's paged KV cache gives every layer the same tokens (one "
    "slot mapping and one attention metadata per step for all layers); in-LLM methods run on the transformers "
    "path (vtprune.patch)"
)
SIZE_REASON = (
    "its kept-token count is not a function of the image size alone: vLLM reserves each image's prompt slots in "
    "the front end before the vision tower runs, so only methods whose budget follows from the image size "
    "(fastervlm, fopru, random, uniform) can run there; this one runs on the transformers path (vtprune.patch)"
)
TEXT_REASON = (
    "its selection reads the prompt (a query), and vLLM computes an image's embeddings once and reuses them by "
    "image hash for any prompt (the encoder cache); query-aware methods run on the transformers path "
    "(vtprune.patch)"
)


@dataclass(frozen=True)
class ServingPlan:
    """One pre-LLM method on a single-resolution (LLaVA-1.5) model, as the vLLM model runs it.

    ``layout``: one image as the projector's tokens; ``probes``: probe name -> (kind, encoder layer index
    among the layers vLLM builds); ``first_column``: the tower column the image's tokens start at (1 drops
    [CLS] with the "default" select strategy), as the transformers adapter's probes do.
    """

    method: Method
    layout: VisualLayout
    probes: dict
    first_column: int

    @property
    def kept_tokens(self) -> int:
        return self.method.size_budget(self.layout)

    def keeps_everything(self) -> bool:
        return self.method.keeps_everything(self.layout)

    def select(self, scores: dict, num_images: int, device) -> torch.Tensor:
        """(num_images, k) sorted kept indices: the method's own ``select``, as on the transformers path."""
        score = next(iter(scores.values()), None)  # one probe per single-resolution method
        return self.method.select(score, num_images, self.layout, device)


def spec_of(hf_config):
    """The ``vtprune`` entry of a model config, or None (the model runs unpruned)."""
    return getattr(hf_config, CONFIG_KEY, None)


def build_method(spec, architecture: str) -> Method:
    """The one pre-LLM method of ``spec``, or the refusal: same parsing and errors as ``vtprune.patch``."""
    methods = build_methods(spec)
    prefix = f"vtprune in vLLM ({architecture}, {CONFIG_KEY}={spec!r})"
    if not methods:
        raise ValueError(f"{prefix}: no method to apply; give one, e.g. {{'{CONFIG_KEY}': 'fastervlm:keep_ratio=0.1'}}")
    if len(methods) > 1:
        names = ", ".join(f"{m.name} ({m.stage})" for m in methods)
        raise ValueError(f"{prefix}: vLLM runs one pre-LLM method; got the stages {names}")
    (method,) = methods
    if method.stage != "pre_llm":
        raise ValueError(f"{prefix}: method {method.name!r} cannot run in vLLM: {IN_LLM_REASON}")
    if method.config.positions != "compact":
        raise ValueError(
            f"{prefix}: positions={method.config.positions!r} keeps each token's original position id, but vLLM "
            "numbers the shortened prompt 0, 1, 2, ... (re-compacted, FasterVLM's official rule); use "
            "positions='compact'"
        )
    return method


def serving_plan(hf_config, architecture: str, built_layers: int) -> ServingPlan | None:
    """The validated plan for a LLaVA-1.5-style config (CLIP tower, one grid per image), or None.

    built_layers: the tower layers vLLM builds (up to the feature layer); the feature layer's
    attention is the last of them.
    """
    spec = spec_of(hf_config)
    if spec is None:
        return None
    method = build_method(spec, architecture)
    prefix = f"vtprune in vLLM ({architecture}): method {method.name!r}"
    vision = hf_config.vision_config
    if vision.model_type != "clip_vision_model":
        raise ValueError(f"{prefix}: vision tower {vision.model_type!r} is not supported yet (CLIP towers are)")
    full = hf_config.vision_feature_select_strategy == "full"
    side = vision.image_size // vision.patch_size
    layout = VisualLayout(num_tokens=side * side + int(full), grid=(side, side), num_prefix=int(full))
    if method.multi_crop_only:
        raise ValueError(
            f"{prefix} splits a budget across the crops of high-resolution (AnyRes) images; {architecture} sees "
            "single-resolution images: use fastervlm, fopru, random or uniform"
        )
    if hasattr(method.config, "query"):  # query-aware, as PruneHandle.set_query finds them
        raise ValueError(f"{prefix} cannot run in vLLM: {TEXT_REASON}")
    if method.size_budget(layout) is None:
        raise ValueError(f"{prefix} cannot run in vLLM: {SIZE_REASON}")
    if method.merges or method.replaces_features:
        raise ValueError(
            f"{prefix} rewrites token values (merged or resized tokens); the vLLM integration keeps a subset of "
            "the tower's tokens only, so far: use fastervlm, fopru, random or uniform, or the transformers path"
        )
    probes = {}
    for name, (kind, layer) in method.vision_probes().items():
        if kind not in SERVED_PROBES:
            raise ValueError(
                f"{prefix} needs the {kind!r} signal of the vision tower, which the vLLM integration does not compute "
                f"(it computes {', '.join(SERVED_PROBES)} attention rows)"
            )
        index = built_layers - 1 if layer == "feature" else layer % vision.num_hidden_layers
        if not 0 <= index < built_layers:
            raise ValueError(
                f"{prefix} scores at vision layer {layer}, but vLLM builds the tower only up to the feature layer "
                f"({built_layers} layers); choose a layer below {built_layers}"
            )
        probes[name] = (kind, index)
    return ServingPlan(method, layout, probes, first_column=0 if full else 1)
