"""Tiny random models of the original LLaVA code base (PyPI ``llava-torch``), built offline.

The original ``CLIPVisionTower`` loads its CLIP tower with ``CLIPVisionModel.from_pretrained``
from a name or a folder. Nothing can be downloaded here, so :func:`save_clip_tower` writes a
tiny random CLIP vision model (and its image processor) into a local folder, and
``mm_vision_tower`` points at that folder; the LLM (a ``LlavaLlamaForCausalLM``) is built from
a config with random weights. Works with the package's own pinned era (transformers 4.37) and
with transformers 5 (the package installed ``--no-deps``).

:func:`to_transformers_llava` converts such a model into a transformers
``LlavaForConditionalGeneration`` with the same weights (transformers 5 only): the reference
for parity tests.
"""

from __future__ import annotations

import os

import torch

IMAGE_TOKEN_INDEX = -200  # llava.constants.IMAGE_TOKEN_INDEX: the placeholder id in input_ids
PAD_TOKEN_ID = 0


def llava_installed() -> bool:
    """Whether the original LLaVA package (``llava-torch``) can be imported here."""
    try:
        from llava.model import LlavaLlamaForCausalLM  # noqa: F401
    except ImportError:
        return False
    return True


def save_clip_tower(
    path: str | os.PathLike,
    *,
    image_size=32,
    patch_size=8,
    hidden=32,
    layers=3,
    heads=4,
    seed=0,
) -> str:
    """A tiny random CLIP vision tower (+ image processor) saved with ``save_pretrained``."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    from vtprune.evals.models.transformers_vlms import clip_vision_config

    config = clip_vision_config(image_size, patch_size, hidden, layers, heads)
    torch.manual_seed(seed)
    CLIPVisionModel(config).save_pretrained(path)
    size = {"shortest_edge": image_size}
    CLIPImageProcessor(size=size, crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    return str(path)


def llava_original_config(
    tower_path: str,
    *,
    hidden=64,
    layers=2,
    heads=4,
    kv_heads=2,
    intermediate=128,
    vocab=128,
    select_layer=-2,
    select_feature="patch",
    projector="mlp2x_gelu",
    padding_side="right",
    attn_implementation="sdpa",
    **extra,
):
    """A ``llava.model.LlavaConfig`` (model_type ``llava_llama``) over the CLIP tower folder."""
    from llava.model import LlavaConfig
    from transformers import CLIPVisionConfig

    from vtprune.evals.models.transformers_vlms import decoder_options

    vision = CLIPVisionConfig.from_pretrained(tower_path)
    options = dict(
        **decoder_options(hidden, layers, heads, kv_heads, intermediate, vocab),
        mm_vision_tower=tower_path,
        mm_hidden_size=vision.hidden_size,
        mm_projector_type=projector,
        mm_vision_select_layer=select_layer,
        mm_vision_select_feature=select_feature,
        mm_patch_merge_type="flat",
        image_aspect_ratio="pad",
        use_mm_proj=True,
        tokenizer_padding_side=padding_side,
    )
    config = LlavaConfig(**{**options, **extra})
    config._attn_implementation = attn_implementation
    return config


def build_llava_original(config, seed: int = 0, dtype=torch.float32):
    """``LlavaLlamaForCausalLM`` with random weights; its CLIP tower loaded from the folder."""
    from llava.model import LlavaLlamaForCausalLM

    torch.manual_seed(seed)
    model = LlavaLlamaForCausalLM(config)
    newline = getattr(model.get_model(), "image_newline", None)
    if newline is not None:  # the package allocates it with torch.empty: uninitialised memory, NaN on some machines
        with torch.no_grad():
            newline.normal_(std=config.hidden_size**-0.5)
    tower = model.get_vision_tower()
    if not tower.is_loaded:  # built with delay_load=True, as load_pretrained_model does
        tower.load_model()
    model = model.to(dtype).eval()
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    return model


def tiny_llava_original(tower_path: str, seed: int = 0, **kwargs):
    """A few-layer original LLaVA (CLIP tower 4 x 4 patches from ``tower_path``, 2-layer Llama)."""
    return build_llava_original(llava_original_config(tower_path, **kwargs), seed=seed)


def original_prompt(text_lengths, num_images=1, seed=0, vocab=128) -> torch.Tensor:
    """One prompt as the original code base tokenizes it: one ``-200`` id per image. Shape (L,)."""
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for index, length in enumerate(text_lengths):
        parts.append(torch.randint(4, vocab, (length,), generator=generator))
        if index < num_images:
            parts.append(torch.tensor([IMAGE_TOKEN_INDEX]))
    return torch.cat(parts)


def to_transformers_llava(model, image_token_id: int = 3):
    """The same weights as a transformers ``LlavaForConditionalGeneration`` (transformers 5).

    Prompts convert with :func:`to_transformers_prompt` (each ``-200`` becomes N image tokens).
    The projector must be ``mlp2x_gelu`` (transformers' ``LlavaMultiModalProjector``).
    """
    import transformers
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if int(transformers.__version__.split(".")[0]) < 5:
        raise RuntimeError(f"to_transformers_llava needs transformers 5 (found {transformers.__version__})")
    config = model.config
    if getattr(config, "mm_projector_type", "linear") != "mlp2x_gelu":
        raise ValueError("only the mlp2x_gelu projector has a transformers LLaVA equivalent")
    tower = model.get_vision_tower()
    vision = CLIPVisionConfig.from_dict(tower.vision_tower.config.to_dict())
    llava_only = ("model_type", "architectures", "use_mm_proj", "image_aspect_ratio", "tokenizer_padding_side")
    text = LlamaConfig.from_dict(
        {k: v for k, v in config.to_dict().items() if not k.startswith("mm_") and k not in llava_only}
    )
    strategy = {"patch": "default", "cls_patch": "full"}[getattr(config, "mm_vision_select_feature", "patch")]
    side = vision.image_size // vision.patch_size
    hf_config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        vision_feature_layer=config.mm_vision_select_layer,
        vision_feature_select_strategy=strategy,
        image_seq_length=side * side + (strategy == "full"),
        projector_hidden_act="gelu",
    )
    attn = model.config._attn_implementation
    for sub in (hf_config, hf_config.vision_config, hf_config.text_config):
        sub._attn_implementation = attn
    hf_config.vision_config._attn_implementation = tower.vision_tower.config._attn_implementation
    twin = LlavaForConditionalGeneration(hf_config).to(model.dtype).eval()
    state = {}
    for name, value in model.state_dict().items():
        if name.startswith("model.vision_tower.vision_tower."):
            state["model.vision_tower." + name.removeprefix("model.vision_tower.vision_tower.")] = value
        elif name.startswith("model.mm_projector."):
            index, rest = name.removeprefix("model.mm_projector.").split(".", 1)
            state[f"model.multi_modal_projector.linear_{1 if index == '0' else 2}.{rest}"] = value
        elif name.startswith("model."):
            state["model.language_model." + name.removeprefix("model.")] = value
        else:
            state[name] = value
    missing, unexpected = twin.load_state_dict(state, strict=False)
    missing = [name for name in missing if "position_ids" not in name]
    if missing or unexpected:
        raise RuntimeError(f"weight conversion mismatch: missing {missing}, unexpected {unexpected}")
    twin.generation_config.pad_token_id = PAD_TOKEN_ID
    return twin


def to_transformers_prompt(input_ids: torch.Tensor, tokens_per_image: int, image_token_id: int = 3) -> torch.Tensor:
    """A 1-D original prompt with each ``-200`` expanded into ``tokens_per_image`` image tokens."""
    parts = []
    for token in input_ids.tolist():
        parts.extend([image_token_id] * tokens_per_image if token == IMAGE_TOKEN_INDEX else [token])
    return torch.tensor(parts, dtype=input_ids.dtype)
