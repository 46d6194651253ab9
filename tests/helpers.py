"""Independent references for the tests: eager attention and hand-built pruned sequences."""

from __future__ import annotations

import torch

from vtprune.evals.models.transformers_vlms import IMAGE_TOKEN_ID, build_llava


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
