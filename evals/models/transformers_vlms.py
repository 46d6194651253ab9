"""Models built from configs (random weights): tests, the demo and the benchmark use these.

No weights can be downloaded here, so every model is built from a config; the shapes of the
"realistic" builders follow the checkpoints users load.
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN_ID = 3
PAD_TOKEN_ID = 0


def decoder_options(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=128) -> dict:
    """The config fields of a small Llama-style decoder (shared with the original-LLaVA builder)."""
    return dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        vocab_size=vocab,
        max_position_embeddings=4096,
        pad_token_id=PAD_TOKEN_ID,
        tie_word_embeddings=False,
    )


def text_config(model_type="llama", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=128):
    """A small decoder config of the given family (llama, mistral, qwen2)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **decoder_options(hidden, layers, heads, kv_heads, intermediate, vocab))


def clip_vision_config(image_size=32, patch_size=8, hidden=32, layers=3, heads=4) -> CLIPVisionConfig:
    """A small CLIP vision tower's config (MLP 4x wide): the tower of the tiny LLaVA and of the original LLaVA."""
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=hidden,
    )


def llava_config(
    *,
    image_size=32,
    patch_size=8,
    vision_hidden=32,
    vision_layers=3,
    vision_heads=4,
    text=None,
    feature_layer=-2,
    select_strategy="default",
    attn_implementation="sdpa",
) -> LlavaConfig:
    vision = clip_vision_config(image_size, patch_size, vision_hidden, vision_layers, vision_heads)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text if text is not None else text_config(),
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=select_strategy,
        image_seq_length=(image_size // patch_size) ** 2,
    )
    config._attn_implementation = attn_implementation
    config.vision_config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    return config


def build_llava(config: LlavaConfig, seed: int = 0, dtype=torch.float32) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).to(dtype).eval()
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    return model


def tiny_llava(seed: int = 0, **kwargs) -> LlavaForConditionalGeneration:
    """A few-layer LLaVA (CLIP tower 4x4 patches, 2-layer Llama): milliseconds per forward."""
    return build_llava(llava_config(**kwargs), seed=seed)


def llava15_shaped_config(scale: str = "realistic", attn_implementation="sdpa") -> LlavaConfig:
    """LLaVA-1.5 shape: CLIP ViT-L/14-336 tower (576 tokens, layer -2) and a Llama LLM.

    ``realistic``: the full ViT-L tower and a ~0.5B Llama (the benchmark's model).
    ``small``: the same token geometry with a narrow tower and LLM (the demo's model).
    """
    if scale == "realistic":
        vision = {"vision_hidden": 1024, "vision_layers": 24, "vision_heads": 16}
        text = text_config(hidden=1024, layers=24, heads=16, kv_heads=16, intermediate=4096, vocab=32064)
    elif scale == "small":
        vision = {"vision_hidden": 192, "vision_layers": 6, "vision_heads": 3}
        text = text_config(hidden=384, layers=6, heads=6, kv_heads=6, intermediate=1024, vocab=32064)
    else:
        raise ValueError(f"scale must be 'realistic' or 'small', got {scale!r}")
    config = llava_config(image_size=336, patch_size=14, text=text, attn_implementation=attn_implementation, **vision)
    config.vision_config.intermediate_size = 4 * config.vision_config.hidden_size
    return config


def tiny_llava_next(seed: int = 0, attn_implementation="sdpa", **kwargs):
    """A few-layer LLaVA-NeXT: 32 px CLIP tower (4 x 4 patches), AnyRes crops up to 64 x 64 px."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    base = llava_config(attn_implementation=attn_implementation, **kwargs)
    config = LlavaNextConfig(
        vision_config=base.vision_config,
        text_config=base.text_config,
        image_token_id=IMAGE_TOKEN_ID,
        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
        vision_feature_layer=base.vision_feature_layer,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    return model


def llava_next_shaped(scale: str = "realistic", seed: int = 0):
    """LLaVA-NeXT shape: the LLaVA-1.5-shaped tower and LLM with AnyRes crops of 336 px.

    A 672 x 672 image becomes a base image plus 2 x 2 crops: 5 x 576 patch tokens, packed as
    576 + 48 rows x (48 + 1 newline) = 2928 image tokens.
    """
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    base = llava15_shaped_config(scale)
    config = LlavaNextConfig(
        vision_config=base.vision_config,
        text_config=base.text_config,
        image_token_id=IMAGE_TOKEN_ID,
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = base._attn_implementation
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    return model


# -- Qwen2-VL and LLaVA-OneVision (issue 7) --------------------------------------------------------
VIDEO_TOKEN_ID = 4
VISION_START_ID = 5
VISION_END_ID = 6


def tiny_qwen2_vl(seed: int = 0, attn_implementation="sdpa", layers=4, vision_depth=2, hidden=64, vocab=128):
    """A few-layer Qwen2-VL: 4 px patches, 2 x 2 merge, temporal patch 2, M-RoPE sections (2, 3, 3)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    heads = 4
    head_dim = hidden // heads
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]  # sums to head_dim / 2 (16 / 24 / 24 of 64)
    config = Qwen2VLConfig(
        vision_config=dict(
            depth=vision_depth,
            embed_dim=32,
            hidden_size=hidden,
            num_heads=4,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        ),
        text_config=dict(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
            pad_token_id=PAD_TOKEN_ID,
            bos_token_id=1,
            eos_token_id=2,
        ),
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
    )
    for sub in (config, config.vision_config, config.text_config):
        sub._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.eos_token_id = None
    return model


ONEVISION_PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 96], [128, 128]]


def tiny_llava_onevision(seed: int = 0, attn_implementation="sdpa", layers=2, pinpoints=None):
    """A few-layer LLaVA-OneVision: 32 px SigLIP tower (4 x 4 patches, no [CLS]), AnyRes-max-9 crops.

    The default pinpoints go up to 4 x 4 crops (128 px), so large images exercise the model's
    resize of the crop canvas (more than 9 base images' worth of tokens).
    """
    from transformers import SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8
    )
    return _build_onevision(
        vision,
        text_config("qwen2", layers=layers),
        seed,
        attn_implementation,
        image_grid_pinpoints=pinpoints or ONEVISION_PINPOINTS,
    )


def llava_onevision_shaped(layers: int = 2, vision_layers: int = 1, seed: int = 0, attn_implementation="sdpa"):
    """LLaVA-OneVision-0.5B shape with fewer layers: SigLIP-so400m-shaped tower and Qwen2-0.5B-wide LLM.

    Tower: 384 px, patch 14 (27 x 27 patches; a video frame is pooled to 14 x 14 = 196 tokens),
    1152 wide, MLP 4304, 16 heads, ``vision_layers`` of its 27 layers. LLM: Qwen2-0.5B's width
    (896, 14 heads, 2 KV heads, MLP 4864, vocabulary 151936), ``layers`` of its 24 layers.
    """
    from transformers import SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=vision_layers,
        num_attention_heads=16,
        image_size=384,
        patch_size=14,
    )
    text = text_config("qwen2", hidden=896, layers=layers, heads=14, kv_heads=2, intermediate=4864, vocab=151936)
    text.max_position_embeddings = 32768
    return _build_onevision(vision, text, seed, attn_implementation)


def _build_onevision(vision, text, seed: int, attn_implementation: str, **config):
    """``LlavaOnevisionForConditionalGeneration`` (random weights, ``seed``) over every patch ("full")."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        **config,
    )
    for sub in (config, config.vision_config, config.text_config):
        sub._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    return model


# -- InternVL (HF-native) and LLaVA-NeXT-Video (issue 12) ------------------------------------------
def tiny_internvl(seed: int = 0, attn_implementation="sdpa", layers=2, vision_layers=3, use_qk_norm=False, vocab=128):
    """A few-layer HF-native InternVL: 32 px InternViT tiles (8 x 8 patches of 4 px, [CLS]), pixel shuffle
    0.5 (16 tokens per tile), a Qwen2 decoder. Images are tiles; the processor's ``<img>`` / ``</img>``
    around each image's tokens are ``VISION_START_ID`` / ``VISION_END_ID`` here."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig

    vision = InternVLVisionConfig(
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=32,
        patch_size=4,
        use_qk_norm=use_qk_norm,
        norm_type="rms_norm" if use_qk_norm else "layer_norm",
    )
    config = InternVLConfig(
        vision_config=vision,
        text_config=text_config("qwen2", layers=layers, vocab=vocab),
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=16,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    for sub in (config, config.vision_config, config.text_config):
        sub._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    return model


def tiny_llava_next_video(seed: int = 0, attn_implementation="sdpa", layers=2, pool_mode="average", image_size=32):
    """A few-layer LLaVA-NeXT-Video: the tiny LLaVA-NeXT's CLIP tower (32 px: 4 x 4 patches of 8 px) and AnyRes
    crops for images; video frames pooled 2 x 2 (``pool_mode``) to 2 x 2 tokens each (4 x 4 at 64 px); Llama."""
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    base = llava_config(image_size=image_size, text=text_config(layers=layers), attn_implementation=attn_implementation)
    side = image_size
    config = LlavaNextVideoConfig(
        vision_config=base.vision_config,
        text_config=base.text_config,
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=VIDEO_TOKEN_ID,
        image_grid_pinpoints=[[side, 2 * side], [2 * side, side], [2 * side, 2 * side]],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        spatial_pool_mode=pool_mode,
        spatial_pool_stride=2,
        image_seq_length=(image_size // 8) ** 2,
        video_seq_length=(image_size // 16) ** 2,
    )
    for sub in (config, config.vision_config, config.text_config):
        sub._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = LlavaNextVideoForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    return model


# -- Qwen2.5-VL and Qwen3-VL (issue 12) ------------------------------------------------------------
def _qwen_text(hidden: int, layers: int, heads: int = 4, vocab: int = 128, interleaved: bool = False, **extra):
    """The text config fields of a few-layer Qwen-VL decoder (M-RoPE sections summing to head_dim / 2)."""
    head_dim = hidden // heads
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
    if interleaved:
        rope["mrope_interleaved"] = True
    return dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_parameters=rope,
        pad_token_id=PAD_TOKEN_ID,
        **extra,
    )


def _qwen_tokens() -> dict:
    return dict(
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
    )


def _build_qwen(model_class, config, seed: int, attn_implementation: str):
    for sub in (config, config.vision_config, config.text_config):
        sub._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = model_class(config).eval()
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    model.generation_config.eos_token_id = None
    return model


def tiny_qwen2_5_vl(seed: int = 0, attn_implementation="sdpa", layers=4, hidden=64, vocab=128):
    """A few-layer Qwen2.5-VL: 4 px patches, 2 x 2 merge, temporal patch 2; ViT block 0 attends in
    windows of 2 x 2 merged tokens (``window_size`` 16 px), block 1 over the whole frame
    (``fullatt_block_indexes`` [1]); 2 video tokens per second of ``second_per_grid_ts``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=4,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
            window_size=16,
            fullatt_block_indexes=[1],
            tokens_per_second=2,
            out_hidden_size=hidden,
        ),
        text_config=_qwen_text(hidden, layers, vocab=vocab, bos_token_id=1, eos_token_id=2),
        **_qwen_tokens(),
    )
    return _build_qwen(Qwen2_5_VLForConditionalGeneration, config, seed, attn_implementation)


def tiny_qwen3_vl(seed: int = 0, attn_implementation="sdpa", layers=4, hidden=64, vocab=128, moe=False):
    """A few-layer Qwen3-VL (``moe``: Qwen3-VL-MoE, 4 experts, 2 per token): 4 px patches, 2 x 2 merge,
    a learned 4 x 4 position table, 3 ViT blocks whose outputs all feed deepstack (added after LLM layers
    0, 1 and 2), a Qwen3 decoder (q/k norms) with interleaved M-RoPE."""
    import transformers

    vision = dict(
        depth=3,
        hidden_size=32,
        intermediate_size=64,
        num_heads=4,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        num_position_embeddings=16,
        deepstack_visual_indexes=[0, 1, 2],
        out_hidden_size=hidden,
    )
    text = _qwen_text(hidden, layers, vocab=vocab, interleaved=True, head_dim=hidden // 4)
    if moe:
        text |= dict(moe_intermediate_size=hidden, num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
    prefix = "Qwen3VLMoe" if moe else "Qwen3VL"
    config = getattr(transformers, f"{prefix}Config")(vision_config=vision, text_config=text, **_qwen_tokens())
    return _build_qwen(getattr(transformers, f"{prefix}ForConditionalGeneration"), config, seed, attn_implementation)


# -- Gemma 3 and Idefics3 / SmolVLM (issue 12) ------------------------------------------------------
BOI_TOKEN_ID = 5  # Gemma 3's <start_of_image> / Idefics3's <fake_token_around_image> here
EOI_TOKEN_ID = 6  # Gemma 3's <end_of_image>
GLOBAL_IMAGE_TOKEN_ID = 7  # Idefics3's <global-img>


def tiny_gemma3(seed: int = 0, attn_implementation="sdpa", layers=4, sliding_window=8, tokens_per_image=16, vocab=128):
    """A few-layer Gemma 3: 64 px SigLIP tower (16 x 16 patches of 4 px, no [CLS]) average-pooled 4 x 4 to
    ``tokens_per_image`` (16: a 4 x 4 grid) tokens per image, as Gemma 3's 64 x 64 -> 16 x 16; a Gemma 3
    decoder whose layers alternate sliding (window ``sliding_window``, shorter than an image) and full."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    vision = SiglipVisionConfig(
        hidden_size=32, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=64, patch_size=4
    )
    text = Gemma3TextConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=sliding_window,
        sliding_window_pattern=2,
        max_position_embeddings=4096,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=BOI_TOKEN_ID,
        eoi_token_index=EOI_TOKEN_ID,
        image_token_index=IMAGE_TOKEN_ID,
        tie_word_embeddings=False,
    )
    for sub in (config, config.vision_config, config.text_config):
        sub._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():  # Gemma 3's init zeroes the projector and the tower's LayerNorm weights: give them values
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)
        for name, parameter in model.model.vision_tower.named_parameters():
            if "norm" in name and name.endswith("weight"):
                parameter.normal_(1.0, 0.1)
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    return model


def _tiny_idefics3_family(config_class, model_class, seed, attn_implementation, layers):
    config = config_class(
        vision_config=dict(
            hidden_size=32,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=32,
            patch_size=4,
        ),
        text_config=text_config(layers=layers).to_dict(),
        image_token_id=IMAGE_TOKEN_ID,
        scale_factor=2,
        tie_word_embeddings=False,
    )
    for sub in (config, config.vision_config, config.text_config):
        sub._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():  # the init zeroes the tower's LayerNorm weights: give them values
        for name, parameter in model.model.vision_model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                parameter.normal_(1.0, 0.1)
    model.generation_config.pad_token_id = PAD_TOKEN_ID
    return model


def tiny_idefics3(seed: int = 0, attn_implementation="sdpa", layers=2):
    """A few-layer Idefics3: 32 px SigLIP-style tiles (8 x 8 patches of 4 px, no [CLS]), pixel shuffle 2
    (16 tokens per tile: each the 2 x 2 block of patches, concatenated), a Llama decoder at ``text_model``."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    return _tiny_idefics3_family(Idefics3Config, Idefics3ForConditionalGeneration, seed, attn_implementation, layers)


def tiny_smolvlm(seed: int = 0, attn_implementation="sdpa", layers=2):
    """A few-layer SmolVLM, shaped as :func:`tiny_idefics3` (SmolVLM's code path: the same layout)."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    return _tiny_idefics3_family(SmolVLMConfig, SmolVLMForConditionalGeneration, seed, attn_implementation, layers)


def qwen2_5_vl_shaped(layers: int = 3, vision_depth: int = 2, vocab: int = 4096, seed: int = 0):
    """Qwen2.5-VL-7B's widths with fewer layers: a ViT 1280 wide (16 heads, MLP 3420, patch 14, windows of
    112 px; ``vision_depth`` blocks, the last attending over the whole image as the released blocks 7, 15,
    23, 31 do) merging 2 x 2 patches into a 3584-wide LLM (28 heads, 4 KV heads, MLP 18944, M-RoPE
    16/24/24), ``layers`` of its 28 layers. The vocabulary is ``vocab`` (the checkpoint's 152064 would add
    4 GB of embeddings; a prefill computes the last position's logits only). Random weights, fp32, SDPA."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=vision_depth,
            hidden_size=1280,
            intermediate_size=3420,
            num_heads=16,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[vision_depth - 1],
            tokens_per_second=2,
            out_hidden_size=3584,
        ),
        text_config=dict(
            vocab_size=vocab,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=layers,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=32768,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
            pad_token_id=PAD_TOKEN_ID,
            bos_token_id=1,
            eos_token_id=2,
        ),
        **_qwen_tokens(),
    )
    return _build_qwen(Qwen2_5_VLForConditionalGeneration, config, seed, "sdpa")
