"""Emu3 prompt text, as Emu3's official scripts and transformers' `Emu3Processor` build it.

Token strings come from the checkpoint's tokenizer/processor (`bos`, `image_token`), never literals.
"""

from __future__ import annotations

# Emu3-Chat's system text and turn markers (baaivision/Emu3 `multimodal_understanding.py`).
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


# BAAI/Emu3-Chat-hf's chat template (its `chat_template.json`), which checkpoints built here carry too: a system
# message's text as it is, then "USER: " with the turn's images first and its texts after, then "ASSISTANT:".
# Rendering `Emu3.understand`'s prompt through it is what makes vLLM's OpenAI server (which renders chat requests
# with the checkpoint's template) see exactly the prompt the offline API builds.
EMU3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}{% for content in "
    "message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}{{ "
    "content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ 'ASSISTANT:' }}{% endif %}"
)


def chat_messages(text: str, num_images: int, *, image_token: str,
                  system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> list[dict]:
    """One user turn (after the system message, if any) in the chat format Emu3-Chat's template reads.

    Images are image parts unless `text` places its own `image_token` placeholders (their count must then equal
    `num_images`): the template puts image parts before the text, so placed images stay in the text.
    """
    placed = text.count(image_token)
    if placed and placed != num_images:
        raise ValueError(f"the text has {placed} {image_token} placeholder(s) but {num_images} image(s) were given")
    content = [] if placed else [{"type": "image"}] * num_images
    content.append({"type": "text", "text": text})
    system = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}] if system_prompt else []
    return [*system, {"role": "user", "content": content}]


def understanding_prompt(text: str, num_images: int, *, image_token: str,
                         system_prompt: str = DEFAULT_SYSTEM_PROMPT, processor=None) -> str:
    """The understanding prompt without BOS (the engine side adds it; transformers' processor adds its own).

    With a `processor` whose checkpoint has a chat template, the prompt is that template's rendering of
    `chat_messages` (Emu3-Chat-hf: `{system} USER: {<image> per image}{text} ASSISTANT:`). Without one it is
    Emu3's official script's layout, `{system} USER: {<image> per image}{text}. ASSISTANT:`. Images go before the
    text unless `text` places its own `image_token` placeholders; their count must then equal `num_images`.
    """
    if processor is not None and getattr(processor, "chat_template", None):
        messages = chat_messages(text, num_images, image_token=image_token, system_prompt=system_prompt)
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    placed = text.count(image_token)
    if placed == 0:
        text = image_token * num_images + text
    elif placed != num_images:
        raise ValueError(f"the text has {placed} {image_token} placeholder(s) but {num_images} image(s) were given")
    prefix = f"{system_prompt} " if system_prompt else ""
    return f"{prefix}USER: {text}. ASSISTANT:"


# Emu3's official text-to-image defaults (baaivision/Emu3 `image_generation.py`).
POSITIVE_SUFFIX = " masterpiece, film grained, best quality."
NEGATIVE_PROMPT = (
    "lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, fewer digits, cropped, worst "
    "quality, low quality, normal quality, jpeg artifacts, signature, watermark, username, blurry."
)
DEFAULT_CFG_SCALE = 3.0
