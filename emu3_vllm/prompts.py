"""Emu3 prompt text, as Emu3's official scripts and transformers' `Emu3Processor` build it.

Token strings come from the checkpoint's tokenizer/processor (`bos`, `image_token`), never literals.
"""

from __future__ import annotations

# Emu3-Chat's system text and turn markers (baaivision/Emu3 `multimodal_understanding.py`).
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


def understanding_prompt(text: str, num_images: int, *, image_token: str,
                         system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """`{system} USER: {<image> per image}{text}. ASSISTANT:` without BOS (the engine side adds it).

    Images go before the text unless `text` already places its own `image_token` placeholders; the placeholder
    count must then equal `num_images`.
    """
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
