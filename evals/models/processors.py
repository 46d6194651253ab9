"""An offline tokenizer and ``LlavaProcessor`` (nothing is downloaded).

The tokenizer is word-level, trained in milliseconds with ``tokenizers`` on a corpus the
caller gives. Special ids are fixed so that they match :mod:`vtprune.evals.models.transformers_vlms`:
``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, ``<image>`` = 3.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<image>", "<unk>"]
VIDEO_SPECIAL_TOKENS = [
    "<pad>",
    "<s>",
    "</s>",
    "<image>",
    "<video>",
    "<unk>",
]  # <video> = 4 (transformers_vlms.VIDEO_TOKEN_ID)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'video' %}<video>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] != 'user' %}</s>{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tokenizer(
    corpus: list[str], vocab_size: int = 4096, special_tokens: list[str] = SPECIAL_TOKENS, media_tokens=None
) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``corpus`` (words and punctuation)."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size, special_tokens=special_tokens)
    tokenizer.train_from_iterator(corpus + ["USER: ASSISTANT:"], trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_special_tokens=media_tokens
        or {"image_token": "<image>", **({"video_token": "<video>"} if "<video>" in special_tokens else {})},
        padding_side="left",
    )


def build_processor(
    corpus: list[str], image_size: int = 32, patch_size: int = 8, vocab_size: int = 4096
) -> LlavaProcessor:
    """A ``LlavaProcessor`` for a model built with ``llava_config(image_size, patch_size)``."""
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(corpus, vocab_size),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_onevision_processor(
    corpus: list[str], image_size: int = 32, pinpoints=None, vocab_size: int = 128, patch_size: int = 8
):
    """A ``LlavaOnevisionProcessor`` (images and videos) for ``transformers_vlms.tiny_llava_onevision``
    (or ``llava_onevision_shaped`` with ``image_size=384, patch_size=14``)."""
    from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

    from vtprune.evals.models.transformers_vlms import ONEVISION_PINPOINTS

    size = {"height": image_size, "width": image_size}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints or ONEVISION_PINPOINTS),
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        tokenizer=build_tokenizer(corpus, vocab_size, VIDEO_SPECIAL_TOKENS),
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
    )


QWEN2_VL_SPECIAL_TOKENS = [  # ids match transformers_vlms: image 3, video 4, vision start 5, vision end 6
    "<pad>",
    "<s>",
    "</s>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<unk>",
]
QWEN2_VL_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<image>\n", "<|vision_start|><|image_pad|><|vision_end|>").replace(
    "<video>\n", "<|vision_start|><|video_pad|><|vision_end|>"
)


def build_qwen2_vl_processor(corpus: list[str], vocab_size: int = 128, max_side: int = 64):
    """A ``Qwen2VLProcessor`` (images and videos) for ``transformers_vlms.tiny_qwen2_vl`` (4 px patches, 2x2 merge)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    sizes = {"patch_size": 4, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 64, "max_pixels": max_side**2}
    tokenizer = build_tokenizer(
        corpus, vocab_size, QWEN2_VL_SPECIAL_TOKENS, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
    )
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**sizes),
        video_processor=Qwen2VLVideoProcessor(**sizes, do_sample_frames=False, cap_pixels_per_frame=False),
        tokenizer=tokenizer,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


GEMMA3_SPECIAL_TOKENS = [  # ids match transformers_vlms.tiny_gemma3: image 3, <start_of_image> 5, <end_of_image> 6
    "<pad>",
    "<s>",
    "</s>",
    "<image_soft_token>",
    "<unk>",
    "<start_of_image>",
    "<end_of_image>",
]
GEMMA3_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<image>\n", "<start_of_image>")


def build_gemma3_processor(corpus: list[str], vocab_size: int = 128, image_size: int = 64, tokens_per_image: int = 16):
    """A ``Gemma3Processor`` for ``transformers_vlms.tiny_gemma3`` (64 px images, 16 tokens per image)."""
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    tokenizer = build_tokenizer(
        corpus,
        vocab_size,
        GEMMA3_SPECIAL_TOKENS,
        {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
    )
    return Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=tokens_per_image,
    )
