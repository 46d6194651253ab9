"""QuoTA's prompts: the CoT query decoupling template and its parse, the two scoring prompts, a chat turn."""

from __future__ import annotations

import ast
import re

DECOUPLE_TEMPLATE = (
    "Question: {question}\n"
    "Answer in three steps.\n"
    "Step 1: is it necessary to detect specific physical entities to answer the question? Answer yes or no.\n"
    "Step 2: list the objects mentioned in the question as a Python list.\n"
    "Step 3: keep only the physical entities, as a Python list.\n"
    "Example: Question: What color is the dog chasing the ball?\n"
    "Step 1: yes\nStep 2: ['dog', 'ball', 'color']\nStep 3: ['dog', 'ball']\n"
)
ENTITY_PROMPT = (
    "Does the image contain any object of {entities}? A. yes, B. no\nAnswer with the option's letter directly."
)
QUESTION_PROMPT = (
    "{question}\nDoes the image contain sufficient information to answer the given question? A. yes, B. no\n"
    "Answer with the option's letter directly."
)


def parse_entities(output: str) -> list[str] | None:
    """The decoupler's answer -> entities, or None (no entities needed, or unparseable).

    As the official pipeline: regexes ``step 1: (yes|no)`` and ``step 3: (\\[[^\\]]*\\])`` on the
    lower-cased text; the list is read with ``ast.literal_eval`` (the official code ``eval``s it).
    """
    text = str(output).lower()
    step1 = re.search(r"step 1: (yes|no)", text)
    if step1 is None or step1.group(1) != "yes":
        return None
    step3 = re.search(r"step 3: (\[[^\]]*\])", text)
    if step3 is None:
        return None
    try:
        value = ast.literal_eval(step3.group(1))
    except (ValueError, SyntaxError):
        return None
    if not isinstance(value, (list, tuple)):
        return None
    entities = [str(item).strip() for item in value if str(item).strip()]
    return entities or None


def scoring_prompt(question: str, entities: list[str] | None) -> str:
    if entities:
        return ENTITY_PROMPT.format(entities="{" + ", ".join(entities) + "}")
    return QUESTION_PROMPT.format(question=question)


def chat_turn(processor, parts: list[dict]) -> str:
    """One user turn (``parts``: the processor's content items) with the generation prompt, as text."""
    messages = [{"role": "user", "content": parts}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)
