"""A VLM (by default the patched model itself) as QuoTA's frame scorer and query decoupler."""

from __future__ import annotations

import contextlib

import torch

from vtprune.methods.quota.prompts import chat_turn


class ModelScorer:
    """A VLM as QuoTA's frame scorer: one forward per frame, p(yes) = softmax(logits[:, -1])[id of "A"].

    As the official ``frame_retrieve``: each frame alone with the scoring prompt in one chat turn,
    the probability of the option letter for yes over the whole vocabulary at the last position.
    ``model`` / ``processor``: any VLM its processor can feed (default: the patched model itself,
    built by quota from ``processor=``; a patched ``model`` is run with its pruning suspended).
    Frames arrive normalised as the patched model received them; they are mapped back to [0, 1]
    with ``source``'s mean and std (default: ``processor``'s video processor, else its image
    processor: right for the patched model itself; pass the patched model's processor as
    ``source`` when scoring with another VLM) and handed to ``processor`` with
    ``do_rescale=False``: as one-frame videos when the processor has a video processor
    (``as_video``; the frame costs what it costs in the video), else as images (the official
    scorer, Qwen2-VL-2B, takes each frame as an image).
    ``suspend``: a context factory under which ``model`` runs unpruned (quota's ``bind`` sets the
    patched model's ``handle.suspended``; None: the model is not patched).
    """

    def __init__(self, model, processor, source=None, as_video: bool | None = None, yes: str = "A", suspend=None):
        self.model, self.processor, self.suspend = model, processor, suspend
        self.as_video = getattr(processor, "video_processor", None) is not None if as_video is None else as_video
        source = source if source is not None else processor
        normaliser = getattr(source, "video_processor", None) or source.image_processor
        self.mean = torch.tensor(normaliser.image_mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(normaliser.image_std, dtype=torch.float32).view(-1, 1, 1)
        ids = processor.tokenizer.encode(yes, add_special_tokens=False)
        if len(ids) != 1 or ids[0] == processor.tokenizer.unk_token_id:
            raise ValueError(f"quota: the scorer's tokenizer has no single token for the yes option {yes!r}: {ids}")
        self.yes_id = ids[0]

    def bind(self, model, handle) -> None:
        """Called by quota at patch time: on the patched model itself, run it with its pruning suspended."""
        if self.model is model:
            self.suspend = handle.suspended

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor, prompt: str) -> torch.Tensor:
        """(n, C, H, W) normalised frames -> (n,) fp32 yes-probabilities."""
        pictures = (frames.float().cpu() * self.std + self.mean).clamp(0, 1)
        kind = "video" if self.as_video else "image"
        text = chat_turn(self.processor, [{"type": kind}, {"type": "text", "text": prompt}])
        media = {"videos": [p[None] for p in pictures]} if self.as_video else {"images": list(pictures)}
        inputs = self.processor(
            text=[text] * len(pictures), **media, return_tensors="pt", padding=True, do_rescale=False
        )
        dtype = next(self.model.parameters()).dtype
        inputs = {k: v.to(self.model.device, dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
        with self.suspend() if self.suspend is not None else contextlib.nullcontext():
            logits = self.model(**inputs, logits_to_keep=1).logits[:, -1]  # the last position only
        return logits.float().softmax(dim=-1)[:, self.yes_id]


class ModelDecoupler:
    """A VLM, text only, as QuoTA's CoT query decoupler: greedy generation on the chat-formatted prompt."""

    def __init__(self, model, processor, max_new_tokens: int = 256, suspend=None):
        self.model, self.processor, self.max_new_tokens, self.suspend = model, processor, max_new_tokens, suspend

    def bind(self, model, handle) -> None:
        """Called by quota at patch time: on the patched model itself, run it with its pruning suspended."""
        if self.model is model:
            self.suspend = handle.suspended

    @torch.no_grad()
    def __call__(self, prompt: str) -> str:
        text = chat_turn(self.processor, [{"type": "text", "text": prompt}])
        inputs = self.processor.tokenizer([text], return_tensors="pt").to(self.model.device)
        with self.suspend() if self.suspend is not None else contextlib.nullcontext():
            output = self.model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens)
        return self.processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
