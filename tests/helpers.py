"""Independent references for the tests: eager attention and hand-built pruned sequences."""

from __future__ import annotations

import torch

from vtprune.evals.models.transformers_vlms import (
    IMAGE_TOKEN_ID,
    PAD_TOKEN_ID,
    VIDEO_TOKEN_ID,
    VISION_END_ID,
    VISION_START_ID,
    build_llava,
)


def eager_twin(model):
    """The same weights in a model whose vision tower and LLM run eager attention."""
    config = model.config.__class__.from_dict(model.config.to_dict())
    for sub in (config, config.vision_config, config.text_config):
        sub._attn_implementation = "eager"
    twin = build_llava(config)
    twin.load_state_dict(model.state_dict())
    return twin.to(model.dtype).eval()


def eager_cls_attention(model, pixel_values) -> torch.Tensor:
    """FasterVLM's score the official way: eager ``output_attentions`` of the feature layer.

    The attention of the layer whose output is hidden_states[feature_layer] (attentions[-2] for -2),
    query row 0, patch columns (1: for the "default" strategy), mean over heads. (n, N)
    """
    twin = eager_twin(model)
    with torch.no_grad():
        out = twin.model.vision_tower(pixel_values, output_attentions=True, output_hidden_states=True)
    hidden_index = twin.config.vision_feature_layer % (len(out.attentions) + 1)
    first = 0 if twin.config.vision_feature_select_strategy == "full" else 1
    return out.attentions[hidden_index - 1][:, :, 0, first:].float().mean(dim=1)


def pruned_reference_logits(model, input_ids, pixel_values, kept, positions="compact"):
    """Logits of the unpatched model on a sequence pruned by hand (one sample, batch of 1).

    kept: sorted indices into the sample's visual tokens (images concatenated).
    """
    with torch.no_grad():
        embeds = model.get_input_embeddings()(input_ids)
        features = torch.cat(model.model.get_image_features(pixel_values=pixel_values).pooler_output)
        image_positions = (input_ids[0] == IMAGE_TOKEN_ID).nonzero().flatten()
        embeds[0, image_positions] = features.to(embeds.dtype)
        keep = torch.ones(input_ids.shape[1], dtype=torch.bool)
        keep[image_positions] = False
        keep[image_positions[kept]] = True
        columns = keep.nonzero().flatten()
        position_ids = torch.arange(columns.numel()) if positions == "compact" else columns
        hidden = model.model.language_model(
            inputs_embeds=embeds[:, columns],
            position_ids=position_ids[None],
            attention_mask=torch.ones(1, columns.numel(), dtype=torch.long),  # positions may jump: no packing
            use_cache=False,
        ).last_hidden_state
        return model.lm_head(hidden)


# -- prompts for the tiny config-built models ------------------------------------------------


def prompt_ids(text_lengths, num_images=1, tokens_per_image=16, seed=0, vocab=128) -> torch.Tensor:
    """One prompt: random text tokens with ``num_images`` image blocks spread through it.

    text_lengths: the text runs around the images (len = num_images + 1). Shape (L,).
    """
    generator = torch.Generator().manual_seed(seed)
    parts = []
    for index, length in enumerate(text_lengths):
        parts.append(torch.randint(4, vocab, (length,), generator=generator))
        if index < num_images:
            parts.append(torch.full((tokens_per_image,), IMAGE_TOKEN_ID))
    return torch.cat(parts)


def left_pad(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D id tensors into (input_ids, attention_mask)."""
    length = max(s.numel() for s in sequences)
    ids = torch.full((len(sequences), length), PAD_TOKEN_ID, dtype=torch.long)
    mask = torch.zeros(len(sequences), length, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, length - seq.numel() :] = seq
        mask[row, length - seq.numel() :] = 1
    return ids, mask


def qwen2_vl_pixels(grid_thw, seed=0, channels=3, patch=4, temporal=2) -> torch.Tensor:
    """Random flattened patches for a list of (t, h, w) grids, as the Qwen2-VL processor packs them."""
    generator = torch.Generator().manual_seed(seed)
    total = sum(t * h * w for t, h, w in grid_thw)
    return torch.randn(total, channels * temporal * patch * patch, generator=generator)


def qwen2_vl_prompt(text_lengths, grids, kinds=None, merge=2, seed=0, vocab=128):
    """One Qwen2-VL prompt: text runs around visual blocks <start> tokens <end>.

    grids: (t, h, w) patch grids in order of appearance; kinds: "image" / "video" per grid.
    Returns (input_ids (L,), mm_token_type_ids (L,)): 0 text, 1 image, 2 video.
    """
    generator = torch.Generator().manual_seed(seed)
    kinds = kinds or ["image"] * len(grids)
    ids, types = [], []
    for index, length in enumerate(text_lengths):
        run = torch.randint(7, vocab, (length,), generator=generator)
        ids.append(run)
        types.append(torch.zeros(length, dtype=torch.long))
        if index < len(grids):
            t, h, w = grids[index]
            count = t * h * w // merge**2
            token = IMAGE_TOKEN_ID if kinds[index] == "image" else VIDEO_TOKEN_ID
            kind = 1 if kinds[index] == "image" else 2
            ids += [torch.tensor([VISION_START_ID]), torch.full((count,), token), torch.tensor([VISION_END_ID])]
            types += [torch.zeros(1, dtype=torch.long), torch.full((count,), kind), torch.zeros(1, dtype=torch.long)]
    return torch.cat(ids), torch.cat(types)


def qwen2_vl_inputs(grids, kinds=None, seed=0, text=(3, 4), seconds=None) -> dict:
    """A one-sample Qwen-VL forward's inputs: text runs (``text``, then 2 tokens between blocks) around
    one visual block per (t, h, w) grid; kinds: "image" / "video" per grid (default all images);
    seconds: ``second_per_grid_ts`` of every video (Qwen2.5-VL), or None."""
    kinds = kinds or ["image"] * len(grids)
    ids, types = qwen2_vl_prompt(list(text) + [2] * (len(grids) - 1), grids, kinds, seed=seed)
    kw = {"input_ids": ids[None], "mm_token_type_ids": types[None]}
    images = [g for g, k in zip(grids, kinds, strict=True) if k == "image"]
    videos = [g for g, k in zip(grids, kinds, strict=True) if k == "video"]
    if images:
        kw |= {"pixel_values": qwen2_vl_pixels(images, seed=seed), "image_grid_thw": torch.tensor(images)}
    if videos:
        kw |= {"pixel_values_videos": qwen2_vl_pixels(videos, seed=seed + 1), "video_grid_thw": torch.tensor(videos)}
        if seconds is not None:
            kw["second_per_grid_ts"] = torch.full((len(videos),), seconds)
    return kw


def clip_images(n, seed=0):
    """(n, 3, 32, 32) random pixels for the tiny 32 px CLIP towers (4 x 4 patches)."""
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def llava_prompt(text=(4, 6), num_images=1, seed=0):
    """(1, L) one tiny-LLaVA prompt: text runs around ``num_images`` image blocks."""
    return prompt_ids(list(text), num_images=num_images, seed=seed).unsqueeze(0)
