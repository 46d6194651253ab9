"""Train the reference LLaVA model on ShapesVQA, on CPU, seeded and reproducible.

    python -m vtprune.evals.reference.train --out evals/reference/checkpoint   # ~40 min, 2 cores
    python -m vtprune.evals.reference.train --tiny --out /tmp/reference_tiny      # seconds

The model is a standard ``LlavaForConditionalGeneration``: a CLIP ViT tower with a [CLS]
token (96 x 96 pixels, 8-pixel patches: 144 visual tokens), LLaVA's two-layer MLP projector
and a small Llama, with ``vision_feature_layer=-2`` and ``vision_feature_select_strategy=
"default"`` as in LLaVA-1.5. Training follows LLaVA's split of roles in two stages:

1. Vision pretraining (the part CLIP plays for LLaVA). The tower alone learns from
   auxiliary heads that are thrown away afterwards: per-patch heads on the features that
   feed the projector (which colour, shape or letter covers the patch, whether an object's
   centre lies in it, the object's size) and image-level heads on the [CLS] output
   (``pooler_output``, as CLIP's image embedding): which colours, shapes and colour-shape
   pairs are present, which letter is on the tile, how many of each shape. The [CLS] can
   only answer those by attending to the objects, so its attention becomes a saliency map
   that ignores background and clutter, which is what FasterVLM relies on.
2. Visual instruction tuning (LLaVA's stage 2). The tower is frozen, as in LLaVA; the
   projector and the LLM learn to answer questions, with the LM loss on the answer tokens
   (the answer word and ``</s>``) only. Features are computed once per image; several
   questions about one image share the image prefix in one packed sequence whose attention
   mask lets each question see the prefix and itself only (the same logits as separate
   sequences, at a fraction of the cost).

Reproducibility: every random choice comes from ``--seed`` (data order, question choice,
initialisation), deterministic algorithms are on, and the number of threads is fixed by
``--threads`` (float sums depend on it). The saved folder holds the model, the processor
(tokenizer, image processor, chat template) and ``metrics.json`` with the settings, the
training time and the accuracy measured on the held-out test split.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vtprune.evals.models.processors import build_processor
from vtprune.evals.models.transformers_vlms import IMAGE_TOKEN_ID, PAD_TOKEN_ID, build_llava, llava_config, text_config
from vtprune.evals.reference import shapes_vqa as data

REFERENCE_DIR = Path(__file__).resolve().parent / "checkpoint"
GRID = data.IMAGE_SIZE // data.PATCH_SIZE  # 12 x 12 patches
NUM_PATCHES = GRID * GRID
IGNORE = -100


@dataclass
class ModelSize:
    vision_hidden: int = 192
    vision_layers: int = 6
    vision_heads: int = 6
    text_hidden: int = 256
    text_layers: int = 4
    text_heads: int = 8
    text_intermediate: int = 688
    text_init_std: float = 0.06  # wider than Llama's 0.02: a 4-layer model from scratch learns faster


@dataclass
class Settings:
    out: str = str(REFERENCE_DIR)
    seed: int = 0
    threads: int = 2
    num_images: int = 24_000  # training images (records 0 .. num_images - 1 of the train split)
    vision_steps: int = 700
    vision_batch: int = 64
    vision_lr: float = 1e-3
    llm_steps: int = 2400
    llm_batch: int = 16
    llm_lr: float = 1e-3
    questions_per_kind: int = 2  # per image and packed sequence, besides the record's own question
    warmup: int = 100
    val_samples: int = 700
    test_samples: int = 1400
    size: ModelSize = field(default_factory=ModelSize)


TINY = {
    "num_images": 16,
    "vision_steps": 2,
    "vision_batch": 8,
    "llm_steps": 2,
    "llm_batch": 4,
    "warmup": 1,
    "val_samples": 7,
    "test_samples": 7,
    "size": ModelSize(32, 2, 2, 32, 2, 2, 64, 0.02),
}


# -- model and processor ------------------------------------------------------------------------


def build_reference_processor():
    """The offline word-level tokenizer and ``LlavaProcessor`` for 96 x 96 ShapesVQA images."""
    return build_processor(data.corpus(), image_size=data.IMAGE_SIZE, patch_size=data.PATCH_SIZE)


def build_reference_model(size: ModelSize, vocab_size: int, seed: int):
    """A freshly initialised LLaVA-1.5-style model (CLIP tower with [CLS], layer -2, sdpa)."""
    vocab = 8 * math.ceil(vocab_size / 8)
    text = text_config(
        hidden=size.text_hidden,
        layers=size.text_layers,
        heads=size.text_heads,
        kv_heads=size.text_heads,
        intermediate=size.text_intermediate,
        vocab=vocab,
    )
    text.max_position_embeddings = 512
    text.initializer_range = size.text_init_std
    config = llava_config(
        image_size=data.IMAGE_SIZE,
        patch_size=data.PATCH_SIZE,
        vision_hidden=size.vision_hidden,
        vision_layers=size.vision_layers,
        vision_heads=size.vision_heads,
        text=text,
        feature_layer=-2,
        select_strategy="default",
        attn_implementation="sdpa",
    )
    config.text_config.bos_token_id, config.text_config.eos_token_id = 1, 2
    model = build_llava(config, seed=seed)
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = 1, 2
    model.generation_config.max_new_tokens = 4
    return model


# -- training images and their targets ----------------------------------------------------------

COLOUR_IDS = {name: i + 1 for i, name in enumerate(data.COLOURS)}  # 0 = nothing, 9 = glyph tile
SHAPE_IDS = {name: i + 1 for i, name in enumerate(data.SHAPES)}  # 0 = nothing, 6 = glyph tile
LETTER_IDS = {name: i + 1 for i, name in enumerate(data.LETTERS)}  # 0 = not a tile
PAIRS = [(c, s) for c in data.COLOURS for s in data.SHAPES]
MAX_COUNT = 6
PATCH_HEADS = {"colour": len(COLOUR_IDS) + 2, "shape": len(SHAPE_IDS) + 2, "letter": len(LETTER_IDS) + 1}
MULTI_HOT = len(PAIRS) + len(data.COLOURS) + len(data.SHAPES)
_PATCH_ROWS = torch.arange(NUM_PATCHES) // GRID
CELL_OF_PATCH = (_PATCH_ROWS // (GRID // data.CELLS)) * data.CELLS + (torch.arange(NUM_PATCHES) % GRID) // (
    GRID // data.CELLS
)


@dataclass
class TrainImages:
    """Rendered training images and the targets of the vision heads."""

    pixels: torch.Tensor  # (N, 3, 96, 96) uint8
    scenes: list
    questions: list  # the record's own (question, answer) per image
    patch_targets: dict  # name -> (N, 144) long ("size": float, NaN where no object)
    cls_targets: dict  # "multi_hot" (N, 53) float, "letter" (N,) long, "counts" (N, 5) long


def patch_owners(labels: np.ndarray, num_objects: int, min_pixels: int = 6) -> np.ndarray:
    """(144,) int: 1 + index of the object covering most of each patch, 0 below ``min_pixels``."""
    ids = np.arange(1, num_objects + 1)[:, None, None]
    counts = (labels[None] == ids).reshape(num_objects, GRID, data.PATCH_SIZE, GRID, data.PATCH_SIZE).sum((2, 4))
    owner = counts.argmax(0) + 1
    owner[counts.max(0) < min_pixels] = 0
    return owner.reshape(-1)


def object_attributes(obj) -> tuple[int, int, int, float]:
    """(colour id, shape id, letter id, size / 24) of a scene object; the glyph tile has its own ids."""
    if obj.kind == "glyph":
        return len(COLOUR_IDS) + 1, len(SHAPE_IDS) + 1, LETTER_IDS[obj.letter], obj.size / 24
    return COLOUR_IDS[obj.colour], SHAPE_IDS[obj.shape], 0, obj.size / 24


def scene_targets(scene) -> tuple[dict, dict]:
    """Per-patch and [CLS] targets of one scene."""
    owners = patch_owners(data.label_map(scene), len(scene.objects))
    table = np.array([(0, 0, 0, np.nan)] + [object_attributes(o) for o in scene.objects], dtype=np.float64)
    centre = np.zeros(NUM_PATCHES, dtype=np.int64)
    for obj in scene.objects:
        cx, cy = (obj.box[0] + obj.box[2] - 1) // 2, (obj.box[1] + obj.box[3] - 1) // 2
        centre[(cy // data.PATCH_SIZE) * GRID + cx // data.PATCH_SIZE] = 1
    patch = {
        "colour": table[owners, 0].astype(np.int64),
        "shape": table[owners, 1].astype(np.int64),
        "letter": table[owners, 2].astype(np.int64),
        "size": table[owners, 3].astype(np.float32),
        "centre": centre,
    }
    shapes = scene.shapes
    multi_hot = np.zeros(MULTI_HOT, dtype=np.float32)
    for obj in shapes:
        multi_hot[PAIRS.index((obj.colour, obj.shape))] = 1
        multi_hot[len(PAIRS) + COLOUR_IDS[obj.colour] - 1] = 1
        multi_hot[len(PAIRS) + len(COLOUR_IDS) + SHAPE_IDS[obj.shape] - 1] = 1
    counts = [min(MAX_COUNT, sum(o.shape == s for o in shapes)) for s in data.SHAPES]
    cls = {"multi_hot": multi_hot, "letter": LETTER_IDS[scene.glyph.letter] - 1, "counts": np.array(counts)}
    return patch, cls


def render_training_images(num_images: int, split: str = "train") -> TrainImages:
    """Render records 0 .. num_images - 1 of ``split`` with their vision targets."""
    pixels, scenes, questions, patch, cls = [], [], [], [], []
    for index in range(num_images):
        scene, question, answer, _ = data.make_scene(split, index)
        pixels.append(torch.from_numpy(np.array(data.render(scene))).permute(2, 0, 1))
        scenes.append(scene)
        questions.append((question, answer))
        p, c = scene_targets(scene)
        patch.append(p)
        cls.append(c)
    return TrainImages(
        pixels=torch.stack(pixels),
        scenes=scenes,
        questions=questions,
        patch_targets={k: torch.from_numpy(np.stack([p[k] for p in patch])) for k in patch[0]},
        cls_targets={k: torch.from_numpy(np.stack([c[k] for c in cls])) for k in cls[0]},
    )


def normalize(pixels: torch.Tensor, processor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> the ``pixel_values`` the processor gives (rescale, CLIP mean/std)."""
    mean = torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)
    return (pixels.float() / 255 - mean) / std


# -- stage 1: vision pretraining ----------------------------------------------------------------


class VisionHeads(nn.Module):
    """Auxiliary heads, discarded after stage 1: per patch (layer -2) and on [CLS] (pooler)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.patch = nn.ModuleDict({name: nn.Linear(hidden, n) for name, n in PATCH_HEADS.items()})
        self.cell = nn.Linear(hidden, data.CELLS * data.CELLS)
        self.centre = nn.Linear(hidden, 1)
        self.size = nn.Linear(hidden, 1)
        self.multi_hot = nn.Linear(hidden, MULTI_HOT)
        self.letter = nn.Linear(hidden, len(LETTER_IDS))
        self.counts = nn.Linear(hidden, len(data.SHAPES) * (MAX_COUNT + 1))

    def loss(self, patches: torch.Tensor, pooled: torch.Tensor, patch_t: dict, cls_t: dict) -> dict:
        """patches (B, 144, D) from layer -2, pooled (B, D); returns the named losses.

        Colour, cell and centre are asked of every patch; shape and size of the patches an
        object covers, the letter of the patches the tile covers (so that the many empty
        patches do not drown them).
        """
        h = self.norm(patches)
        on_object, on_tile = patch_t["colour"] > 0, patch_t["letter"] > 0
        losses = {
            "colour": F.cross_entropy(self.patch["colour"](h).flatten(0, 1), patch_t["colour"].flatten()),
            "shape": 2 * F.cross_entropy(self.patch["shape"](h[on_object]), patch_t["shape"][on_object]),
            "letter": F.cross_entropy(self.patch["letter"](h[on_tile]), patch_t["letter"][on_tile]),
        }
        cells = CELL_OF_PATCH.expand(len(h), -1)
        losses["cell"] = F.cross_entropy(self.cell(h).flatten(0, 1), cells.flatten())
        losses["centre"] = F.binary_cross_entropy_with_logits(self.centre(h).squeeze(-1), patch_t["centre"].float())
        losses["size"] = 10 * F.mse_loss(self.size(h).squeeze(-1)[on_object], patch_t["size"][on_object])
        losses["cls_multi_hot"] = 4 * F.binary_cross_entropy_with_logits(self.multi_hot(pooled), cls_t["multi_hot"])
        losses["cls_letter"] = F.cross_entropy(self.letter(pooled), cls_t["letter"])
        counts = self.counts(pooled).view(-1, MAX_COUNT + 1)
        losses["cls_counts"] = F.cross_entropy(counts, cls_t["counts"].flatten())
        return losses


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def batches(num_items: int, batch_size: int, steps: int, generator: torch.Generator):
    """``steps`` index batches over shuffled epochs of ``num_items`` items."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(num_items, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]


def train_vision(model, images: TrainImages, processor, settings: Settings, log) -> None:
    """Stage 1: the vision tower with the auxiliary heads."""
    tower = model.model.vision_tower
    heads = VisionHeads(tower.config.hidden_size)
    params = list(tower.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings.vision_lr, weight_decay=0.05)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    tower.train()
    for step, idx in enumerate(batches(len(images.scenes), settings.vision_batch, settings.vision_steps, generator)):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings.vision_steps, settings.vision_lr, settings.warmup)
        out = tower(normalize(images.pixels[idx], processor), output_hidden_states=True)
        patch_t = {k: v[idx] for k, v in images.patch_targets.items()}
        cls_t = {k: v[idx] for k, v in images.cls_targets.items()}
        losses = heads.loss(out.hidden_states[-2][:, 1:], out.pooler_output, patch_t, cls_t)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 50 == 0 or step == settings.vision_steps - 1:
            log(
                f"vision step {step}: loss {loss.item():.3f} "
                + " ".join(f"{k}={v.item():.3f}" for k, v in losses.items())
            )
    tower.eval()
    tower.requires_grad_(False)


@torch.no_grad()
def vision_features(model, pixels: torch.Tensor, processor, batch_size: int = 128) -> torch.Tensor:
    """(N, 144, D) layer -2 patch features, exactly what ``get_image_features`` feeds the projector."""
    tower = model.model.vision_tower
    layer = model.config.vision_feature_layer
    chunks = []
    for start in range(0, len(pixels), batch_size):
        out = tower(normalize(pixels[start : start + batch_size], processor), output_hidden_states=True)
        chunks.append(out.hidden_states[layer][:, 1:])
    return torch.cat(chunks)


# -- stage 2: visual instruction tuning on packed sequences -------------------------------------


class QuestionTokens:
    """Token ids of the chat prompt, split into the shared image prefix and per-question blocks."""

    def __init__(self, processor):
        self.tokenizer = processor.tokenizer
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "{question}"}]}],
            add_generation_prompt=True,
        )
        self.head, self.tail = prompt.split("{question}")  # "USER: <image>\n", " ASSISTANT:"
        head_ids = self.tokenizer(self.head)["input_ids"]
        image_at = head_ids.index(IMAGE_TOKEN_ID)
        self.prefix = head_ids[:image_at] + [IMAGE_TOKEN_ID] * NUM_PATCHES + head_ids[image_at + 1 :]
        self.image_start = image_at
        self._cache: dict[tuple[str, str], tuple[list[int], list[int]]] = {}

    def block(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        """(ids, targets): the question, the answer word and ``</s>``; targets[t] = token t + 1 or IGNORE."""
        key = (question, answer)
        if key not in self._cache:
            text = self.tokenizer(question + self.tail, add_special_tokens=False)["input_ids"]
            answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            targets = [IGNORE] * (len(text) - 1) + answer_ids + [IGNORE]
            self._cache[key] = (text + answer_ids, targets)
        return self._cache[key]


def pick_questions(scene, own: tuple[str, str], per_kind: int, rng: random.Random) -> list[tuple[str, str]]:
    """The record's own question plus up to ``per_kind`` other questions of every kind."""
    by_kind: dict[str, list] = {}
    for kind, question, answer in data.scene_questions(scene):
        if question != own[0]:
            by_kind.setdefault(kind, []).append((question, answer))
    picked = [own]
    for kind in data.KINDS:
        options = by_kind.get(kind, [])
        picked += rng.sample(options, min(per_kind, len(options)))
    return picked


def pack(tokens: QuestionTokens, blocks_per_image: list[list[tuple[str, str]]]) -> dict:
    """Packed batch: one row per image, ``prefix + block_1 + ... + block_n``, right-padded.

    Every block has positions starting right after the prefix and attends to the prefix and to
    itself (causally), so its logits equal those of the plain prompt ``prefix + block``.
    """
    rows = []
    for blocks in blocks_per_image:
        ids, targets, block_id = list(tokens.prefix), [IGNORE] * len(tokens.prefix), [0] * len(tokens.prefix)
        positions = list(range(len(tokens.prefix)))
        for number, (question, answer) in enumerate(blocks, start=1):
            b_ids, b_targets = tokens.block(question, answer)
            ids += b_ids
            targets += b_targets
            block_id += [number] * len(b_ids)
            positions += range(len(tokens.prefix), len(tokens.prefix) + len(b_ids))
        rows.append((ids, targets, block_id, positions))
    length = max(len(r[0]) for r in rows)
    batch = {name: torch.full((len(rows), length), fill) for name, fill in (("ids", PAD_TOKEN_ID), ("targets", IGNORE))}
    batch["block"] = torch.full((len(rows), length), 10_000)
    batch["positions"] = torch.zeros(len(rows), length, dtype=torch.long)
    for r, (ids, targets, block_id, positions) in enumerate(rows):
        n = len(ids)
        batch["ids"][r, :n], batch["targets"][r, :n] = torch.tensor(ids), torch.tensor(targets)
        batch["block"][r, :n], batch["positions"][r, :n] = torch.tensor(block_id), torch.tensor(positions)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    same = batch["block"][:, :, None] == batch["block"][:, None, :]
    to_prefix = (batch["block"] == 0)[:, None, :]
    batch["mask"] = (causal & (same | to_prefix))[:, None]  # (B, 1, T, T) bool, True = attend
    return batch


def packed_logits(model, features: torch.Tensor, batch: dict, image_start: int) -> torch.Tensor:
    """Logits of a packed batch, computed by the model's own modules (projector, layers, head)."""
    base = model.model
    embeds = base.get_input_embeddings()(batch["ids"])
    image = base.multi_modal_projector(features)  # (B, 144, H)
    embeds = torch.cat([embeds[:, :image_start], image, embeds[:, image_start + NUM_PATCHES :]], dim=1)
    lm = base.language_model
    rotary = lm.rotary_emb(embeds, position_ids=batch["positions"])
    hidden = embeds
    for layer in lm.layers:
        hidden = layer(
            hidden, attention_mask=batch["mask"], position_embeddings=rotary, position_ids=batch["positions"]
        )
    return model.lm_head(lm.norm(hidden))


def train_language(model, features, images: TrainImages, tokens: QuestionTokens, settings: Settings, log) -> None:
    """Stage 2: projector + LLM on packed question blocks (the tower stays frozen)."""
    params = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower")]
    optimizer = torch.optim.AdamW(params, lr=settings.llm_lr, weight_decay=0.0, betas=(0.9, 0.95))
    generator = torch.Generator().manual_seed(settings.seed + 2)
    rng = random.Random(settings.seed + 3)
    model.train()
    for step, idx in enumerate(batches(len(images.scenes), settings.llm_batch, settings.llm_steps, generator)):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings.llm_steps, settings.llm_lr, settings.warmup)
        blocks = [
            pick_questions(images.scenes[i], images.questions[i], settings.questions_per_kind, rng)
            for i in idx.tolist()
        ]
        batch = pack(tokens, blocks)
        logits = packed_logits(model, features[idx], batch, tokens.image_start)
        loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten(), ignore_index=IGNORE)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 50 == 0 or step == settings.llm_steps - 1:
            log(f"llm step {step}: loss {loss.item():.4f}")
    model.eval()


@torch.no_grad()
def quick_accuracy(model, features, images: TrainImages, tokens: QuestionTokens, batch_size: int = 32) -> float:
    """Exact match of the first answer token (argmax) on each image's own question."""
    correct = 0
    for start in range(0, len(images.scenes), batch_size):
        rows = [[q] for q in images.questions[start : start + batch_size]]
        batch = pack(tokens, rows)
        logits = packed_logits(model, features[start : start + batch_size], batch, tokens.image_start)
        first = batch["targets"] != IGNORE
        first &= first.cumsum(1) == 1  # the position predicting the answer word
        correct += (logits.argmax(-1)[first] == batch["targets"][first]).sum().item()
    return correct / len(images.scenes)


# -- driver ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def determinism(settings: Settings):
    """Seeds, ``settings.threads`` threads and deterministic algorithms; restores the global state after."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    np.random.seed(settings.seed)
    torch.set_num_threads(settings.threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def train(settings: Settings, log=print) -> dict:
    """Train and save the reference model to ``settings.out``; returns the metrics it records."""
    with determinism(settings):
        started, cpu_started = time.time(), time.process_time()
        processor = build_reference_processor()
        model = build_reference_model(settings.size, len(processor.tokenizer), settings.seed)
        log(f"rendering {settings.num_images} training images")
        images = render_training_images(settings.num_images)
        log(f"stage 1: vision tower, {settings.vision_steps} steps ({time.time() - started:.0f}s)")
        train_vision(model, images, processor, settings, log)
        log(f"caching layer -2 features ({time.time() - started:.0f}s)")
        features = vision_features(model, images.pixels, processor)
        tokens = QuestionTokens(processor)
        log(f"stage 2: projector + LLM, {settings.llm_steps} steps ({time.time() - started:.0f}s)")
        train_language(model, features, images, tokens, settings, log)
        timing = {
            "train_seconds": round(time.time() - started, 1),
            "train_cpu_seconds": round(time.process_time() - cpu_started, 1),
        }
        val = render_training_images(settings.val_samples, split="validation")
        val_accuracy = quick_accuracy(model, vision_features(model, val.pixels, processor), val, tokens)
        log(f"validation accuracy (first answer token): {val_accuracy:.4f}; {timing}")
        return save(model, processor, settings, {**timing, "val_accuracy": val_accuracy})


def save(model, processor, settings: Settings, metrics: dict) -> dict:
    """Write the checkpoint, the processor and ``metrics.json`` (with the test accuracy)."""
    from vtprune.evals.reference.evaluate import TEST_SLICE, evaluate

    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    records = data.make_split("test", settings.test_samples)
    test = evaluate(model, processor, records)
    slice_records = records[:TEST_SLICE] if len(records) >= TEST_SLICE else records
    test_slice = evaluate(model, processor, slice_records)
    metrics = {
        **metrics,
        "test_accuracy": test["accuracy"],
        "test_samples": len(records),
        "test_per_kind": test["per_kind"],
        "test_slice": {"start": 0, "num_samples": len(slice_records), "accuracy": test_slice["accuracy"]},
        "settings": asdict(settings),
        "torch": torch.__version__,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def parse_args(argv=None) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Settings()
    parser.add_argument("--out", default=defaults.out)
    parser.add_argument("--tiny", action="store_true", help="a tiny model and a few steps (tests)")
    for name in ("seed", "threads", "num_images", "vision_steps", "llm_steps", "vision_batch", "llm_batch"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="set both --vision-steps and --llm-steps")
    args = parser.parse_args(argv)
    settings = Settings(**TINY) if args.tiny else Settings()
    settings.out = args.out
    if args.steps is not None:
        settings.vision_steps = settings.llm_steps = args.steps
    for name in ("seed", "threads", "num_images", "vision_steps", "llm_steps", "vision_batch", "llm_batch"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    return settings


def main(argv=None) -> None:
    metrics = train(parse_args(argv))
    print(json.dumps({k: v for k, v in metrics.items() if k != "settings"}, indent=2))


if __name__ == "__main__":
    main()
