"""InternVL (HF-native) adapter: the pixel-shuffle block map, [CLS] scores against an eager tower, tiles with the
thumbnail last, the crop grid from the pixels, and pruned logits against the unpatched model on a hand-pruned
sequence (the contracts every family shares: tests/test_contracts.py)."""

import pytest
import torch
import torch.nn.functional as F

import vtprune
from vtprune.evals.models.transformers_vlms import IMAGE_TOKEN_ID, VISION_END_ID, VISION_START_ID, tiny_internvl
from vtprune.methods.hired import HiRED, HiREDConfig
from vtprune.patches.internvl import crop_grids
from vtprune.types import CropLayout

N = 16  # tokens per tile: 8 x 8 patches, pixel shuffle 0.5


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "qk_norm"])
def models(request):
    """(sdpa model, eager twin with the same weights); qk_norm: InternViT-6B's RMS norms on q and k."""
    model = tiny_internvl(seed=3, layers=4, use_qk_norm=request.param)
    twin = tiny_internvl(seed=3, layers=4, use_qk_norm=request.param, attn_implementation="eager")
    twin.load_state_dict(model.state_dict())
    if request.param:  # random q / k norm weights, so that reading q before the norm would show
        with torch.no_grad():
            for layer in model.model.vision_tower.encoder.layer:
                layer.attention.q_norm.weight.uniform_(0.2, 3.0)
                layer.attention.k_norm.weight.uniform_(0.2, 3.0)
        twin.load_state_dict(model.state_dict())
    return model, twin


def tiles(count, seed=0):
    return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def prompt(tile_counts, seed=0):
    """(1, L): text, then per image <img> 16 x tiles placeholders </img>, then text."""
    generator = torch.Generator().manual_seed(seed)
    parts = [torch.randint(7, 128, (4,), generator=generator)]
    for count in tile_counts:
        parts += [
            torch.tensor([VISION_START_ID]),
            torch.full((N * count,), IMAGE_TOKEN_ID),
            torch.tensor([VISION_END_ID]),
        ]
        parts.append(torch.randint(7, 128, (3,), generator=generator))
    return torch.cat(parts)[None]


def eager_cls_rows(twin, pixel_values, layer=-1):
    """[CLS] query row over the patches from eager ``output_attentions``, mean over heads: (tiles, 64)."""
    with torch.no_grad():
        out = twin.model.vision_tower(pixel_values=pixel_values, output_attentions=True)
    return out.attentions[layer][:, :, 0, 1:].float().mean(dim=1)


def block_sums(rows):
    """(tiles, 64) patch scores -> (tiles, 16): token (i, j) gets patches (2i..2i+1, 2j..2j+1), written out."""
    out = torch.zeros(rows.shape[0], N)
    for i in range(4):
        for j in range(4):
            for di in range(2):
                for dj in range(2):
                    out[:, i * 4 + j] += rows[:, (2 * i + di) * 8 + 2 * j + dj]
    return out


def test_pixel_shuffle_token_is_its_2x2_patch_block(models):
    model, _ = models
    px = tiles(2, seed=1)
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=px).pooler_output  # (2, 16, D)
        patches = model.model.vision_tower(pixel_values=px).last_hidden_state[:, 1:]  # (2, 64, C)
        blocks = torch.stack(
            [
                torch.cat([patches[:, (2 * i + di) * 8 + 2 * j + dj] for di in range(2) for dj in range(2)], dim=-1)
                for i in range(4)
                for j in range(4)
            ],
            dim=1,
        )
        expected = model.model.multi_modal_projector(blocks)
    torch.testing.assert_close(features, expected)


def test_fastervlm_keeps_the_top_of_the_eager_cls_row_per_tile(models):
    model, twin = models
    px = tiles(4, seed=2)  # one image: 3 crops and the thumbnail (last)
    ids = prompt([4], seed=2)
    with vtprune.patched(model, "fastervlm", keep_tokens=5) as handle, torch.no_grad():
        model(input_ids=ids, pixel_values=px)
    reference = block_sums(eager_cls_rows(twin, px))
    expected = torch.cat([reference[t].topk(5).indices.sort().values + t * N for t in range(4)])
    assert handle.last.stages[0].kept[0].tolist() == expected.tolist()


def test_hired_is_the_method_on_the_thumbnail_first_crop_layout(models):
    """HiRED's kept set = HiRED.select_crops on a CropLayout built here: thumbnail (the model's last tile)
    as the base image, the crop grid the tiles were cut with, eager [CLS] rows of layer 0 and the last layer."""
    model, twin = models
    px, grid = tiled_image(2, 1, seed=5)
    ids = prompt([3], seed=5)
    with vtprune.patched(model, "hired", budget_ratio=0.3) as handle, torch.no_grad():
        model(input_ids=ids, pixel_values=px)
    order = torch.tensor([2, 0, 1])  # base first
    scores = {
        "cls": block_sums(eager_cls_rows(twin, px))[order],
        "early": block_sums(eager_cls_rows(twin, px, layer=0))[order],
    }
    valid = torch.ones(3, N, dtype=torch.bool)
    keep = HiRED(HiREDConfig(budget_ratio=0.3)).select_crops(scores, CropLayout((4, 4), grid, valid, valid))
    in_model_order = torch.cat([keep[1:], keep[:1]]).flatten()
    assert handle.last.stages[0].kept[0].tolist() == in_model_order.nonzero().flatten().tolist()


def tiled_image(nh, nw, seed=0):
    """Tiles the way the processor cuts them: a smooth picture resized to the crop canvas and cut in raster
    order, then the picture resized to one tile (the thumbnail) last. Returns ((nh * nw + 1, 3, 32, 32), grid)."""
    coarse = torch.rand(1, 3, 5, 7, generator=torch.Generator().manual_seed(seed))
    picture = F.interpolate(coarse, size=(90, 110), mode="bicubic", align_corners=False)
    canvas = F.interpolate(picture, size=(nh * 32, nw * 32), mode="bicubic", align_corners=False)[0]
    crops = canvas.view(3, nh, 32, nw, 32).permute(1, 3, 0, 2, 4).reshape(nh * nw, 3, 32, 32)
    thumbnail = F.interpolate(picture, size=(32, 32), mode="bicubic", align_corners=False)
    return torch.cat([crops, thumbnail]), (nh, nw)


@pytest.mark.parametrize("grid", [(2, 3), (3, 2), (1, 4), (4, 1), (2, 2), (1, 2)])
def test_crop_grid_recovered_from_the_pixels(grid):
    px, expected = tiled_image(*grid, seed=sum(grid))
    lone = tiles(1, seed=9)
    assert crop_grids(torch.cat([lone, px]), [1, grid[0] * grid[1] + 1]) == [(0, 0), expected]


@pytest.mark.parametrize(
    "spec",
    [
        "fastervlm:keep_ratio=0.25",
        "fastervlm:keep_ratio=0.25,positions=original",
        "hired:budget_ratio=0.3",
        "globalcom2:keep_ratio=0.3",
        "fopru:keep_ratio=0.5,budget=global",
        "random:keep_ratio=0.4",
    ],
)
def test_pruned_logits_equal_the_unpatched_model_on_the_hand_pruned_sequence(models, spec):
    model, _ = models
    px = torch.cat([tiled_image(1, 2, seed=3)[0], tiles(1, seed=4)])  # a 3-tile image, then a lone tile
    ids = prompt([3, 1], seed=6)
    with vtprune.patched(model, spec) as handle, torch.no_grad():
        logits = model(input_ids=ids, pixel_values=px).logits
    kept = handle.last.stages[0].kept[0]
    assert 0 < kept.numel() < 4 * N
    positions = "original" if "original" in spec else "compact"
    torch.testing.assert_close(logits, hand_pruned_logits(model, ids, px, kept, positions))


def hand_pruned_logits(model, input_ids, pixel_values, kept, positions):
    """The unpatched model's logits on the prompt with only the ``kept`` image tokens (batch of 1): its own image
    features scattered into the placeholders, the other placeholders removed, positions renumbered ("compact")
    or as in the full prompt ("original")."""
    with torch.no_grad():
        embeds = model.get_input_embeddings()(input_ids)
        features = model.model.get_image_features(pixel_values=pixel_values).pooler_output.flatten(0, 1)
        image_columns = (input_ids[0] == IMAGE_TOKEN_ID).nonzero().flatten()
        embeds[0, image_columns] = features
        keep = input_ids[0] != IMAGE_TOKEN_ID
        keep[image_columns[kept]] = True
        columns = keep.nonzero().flatten()
        position_ids = torch.arange(columns.numel()) if positions == "compact" else columns
        hidden = model.model.language_model(
            inputs_embeds=embeds[:, columns],
            position_ids=position_ids[None],
            attention_mask=torch.ones(1, columns.numel(), dtype=torch.long),
            use_cache=False,
        ).last_hidden_state
        return model.lm_head(hidden)


def test_a_prompt_whose_image_runs_are_not_whole_tiles_is_refused(models):
    model, _ = models
    ids = prompt([2], seed=1)
    ids[0, 5 + N // 2] = VISION_END_ID  # the model's count still matches (31 placeholders + 1 moved), the runs do not
    ids = torch.cat([ids[:, : 5 + N // 2], torch.tensor([[VISION_START_ID, IMAGE_TOKEN_ID]]), ids[:, 6 + N // 2 :]], 1)
    with (
        vtprune.patched(model, "fastervlm", keep_ratio=0.5),
        pytest.raises(ValueError, match="<img> ... </img>"),
        torch.no_grad(),
    ):
        model(input_ids=ids, pixel_values=tiles(2))


def test_quota_is_refused_at_patch_time(models):
    model, _ = models
    with pytest.raises(ValueError, match="resizes frames"):
        vtprune.patch(model, "quota", keep_ratio=0.5, query="?", scorer=lambda frames, prompt: torch.ones(len(frames)))


# -- the processor's tiles and lmms-eval -------------------------------------------------------------------
CHAT_TEMPLATE = (  # InternVL's: an image part is one <IMG_CONTEXT>, which the processor expands into its tiles
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<IMG_CONTEXT>\n{% elif part['type'] == 'video' %}<video>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] != 'user' %}</s>{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def internvl_processor(corpus, max_patches=6):
    """An offline ``InternVLProcessor`` for ``tiny_internvl``: 32 px tiles, word-level tokenizer whose
    <IMG_CONTEXT>, <img>, </img> ids are the tiny model's image, start and end ids."""
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    from vtprune.evals.models.processors import build_tokenizer

    media = {"context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
    media.update(start_image_token="<img>", end_image_token="</img>")
    specials = ["<pad>", "<s>", "</s>", "<IMG_CONTEXT>", "<video>", "<img>", "</img>", "<unk>"]
    tokenizer = build_tokenizer(corpus, special_tokens=specials, media_tokens=media)
    assert [tokenizer.context_image_token_id, tokenizer.start_image_token_id, tokenizer.end_image_token_id] == [
        IMAGE_TOKEN_ID,
        VISION_START_ID,
        VISION_END_ID,
    ]
    return InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(
            size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1, max_patches=max_patches
        ),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(size={"height": 32, "width": 32}),
        image_seq_length=N,
        chat_template=CHAT_TEMPLATE,
    )


def smooth_picture(height, width, seed):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    channels = [
        (np.sin(x / 7 + c) + np.cos(y / 5 - c)) * 60 + 128 + rng.normal(0, 20, (height, width)) for c in range(3)
    ]
    return Image.fromarray(np.stack(channels, axis=-1).clip(0, 255).astype("uint8"))


@pytest.mark.parametrize("size", [(40, 90), (90, 40), (60, 60), (30, 100), (100, 64), (50, 80)])
def test_crop_grid_of_the_processors_tiles_is_the_grid_it_chose(size):
    from transformers.models.got_ocr2.image_processing_got_ocr2 import get_optimal_tiled_canvas

    processor = internvl_processor(["a"])
    out = processor.image_processor(images=[smooth_picture(*size, seed=sum(size))], return_tensors="pt")
    columns, rows = get_optimal_tiled_canvas(size, (32, 32), 1, 6)
    assert int(out.num_patches[0]) == rows * columns + 1
    assert crop_grids(out.pixel_values, [rows * columns + 1]) == [(rows, columns)]


def test_lmms_eval_internvl_hf_end_to_end(tmp_path):
    import json

    from eval_helpers import answer_always, run_lmms_eval

    from vtprune.evals.tasks import shapes
    from vtprune.evals.tasks.make_task import make_builtin_task

    limit = 4
    processor = internvl_processor(shapes.corpus(), max_patches=4)
    model = tiny_internvl(seed=1, vocab=len(processor.tokenizer))
    answer_always(model, processor.tokenizer, "red")
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    task_dir = make_builtin_task("vtprune_shapes", tmp_path / "tasks", n=limit)
    stats = tmp_path / "stats.json"
    model_args = f"base=internvl_hf,pretrained={tmp_path / 'model'},device=cpu,method=fastervlm,keep_tokens=5"
    result = run_lmms_eval(
        ["--model", "vtprune", "--model_args", f"{model_args},stats_path={stats}", "--tasks", "vtprune_shapes"]
        + ["--include_path", str(task_dir.parent), "--output_path", str(tmp_path / "out"), "--log_samples"],
        tmp_path,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    (results_file,) = (tmp_path / "out").rglob("*_results.json")
    answers = [r["answer"] for r in shapes.records(limit)]
    expected = sum(a == "red" for a in answers) / limit
    assert json.loads(results_file.read_text())["results"]["vtprune_shapes"]["exact_match,none"] == pytest.approx(
        expected
    )
    tiles = processor.image_processor.get_number_of_image_patches(64, 64, {"max_patches": 4})  # shapes: 64 px
    payload = json.loads(stats.read_text())
    assert len(payload["samples"]) == limit
    for sample in payload["samples"]:
        assert sample["visual_tokens_in"] == tiles * N
        assert sample["visual_tokens_kept"] == tiles * 5  # keep_tokens per tile
        assert sample["flops_after"] < sample["flops_before"]


def test_processor_image_and_video_prompt_keeps_the_top_of_each_tile_and_frame(models):
    """The processor's own prompt: an image (crops, then its thumbnail) and a 3-frame video (a lone tile per
    frame, "Frame1: <img> ... </img>"), merged into one pixel_values. budget="global": the image keeps its
    3 x k best tokens across its tiles, each frame its k best (eager [CLS] block sums)."""
    import numpy as np

    model, twin = models
    processor = internvl_processor(["what is shown ?"], max_patches=4)
    frames = np.stack([np.asarray(smooth_picture(40, 40, seed=s)) for s in range(3)])
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "what"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(images=[smooth_picture(40, 90, seed=1)], videos=[frames], text=text, return_tensors="pt")
    tiles = inputs.pixel_values.shape[0]
    assert tiles == 3 + 3  # 1 x 2 crops + thumbnail, then 3 frames
    with vtprune.patched(model, "fastervlm", keep_tokens=4, budget="global") as handle, torch.no_grad():
        model(**inputs)
    reference = block_sums(eager_cls_rows(twin, inputs.pixel_values))
    image = reference[:3].flatten().topk(12).indices.sort().values
    expected = torch.cat([image] + [reference[t].topk(4).indices.sort().values + t * N for t in range(3, tiles)])
    assert handle.last.stages[0].kept[0].tolist() == expected.tolist()


def test_a_method_reading_token_features_from_the_tower_is_refused_at_patch_time(models):
    from dataclasses import dataclass

    from vtprune.methods.base import BudgetConfig, Method
    from vtprune.registry import _METHODS

    @dataclass
    class KeysConfig(BudgetConfig):
        pass

    class KeysMethod(Method):  # a per-patch feature probe, which a 2 x 2 block sum would garble
        name = "keys_probe_test"
        config_class = KeysConfig

        def vision_probes(self):
            return {"keys": ("keys", "feature")}

    vtprune.register_method(KeysMethod)
    try:
        with pytest.raises(ValueError, match="pools only per-patch scores"):
            vtprune.patch(models[0], "keys_probe_test", keep_ratio=0.5)
    finally:
        _METHODS.pop(KeysMethod.name, None)
