"""transformers' own Emu3 generation, called the way our engine must mirror it.

The correctness oracle for the tests and the batch-1 baseline for the benchmarks: one home for how we drive
`Emu3ForConditionalGeneration.generate` (CFG through `guidance_scale` + `negative_prompt_ids`, Emu3's layout
through `prefix_allowed_tokens_fn`), so both measure and compare the same thing.
"""

from __future__ import annotations

from emu3_vllm.layout import ImageTokenIds, allowed_token_ids, num_image_tokens
from emu3_vllm.prompts import understanding_prompt


def hf_generate_image_tokens(model, tokenizer, cond: str, uncond: str, h: int, w: int, scale: float,
                             ids: ImageTokenIds, *, do_sample: bool = False, top_k: int = 2048,
                             temperature: float = 1.0, max_new_tokens: int | None = None) -> list[int]:
    """Generated ids for one image: cond/uncond are full prompt texts (BOS and image header included)."""
    import torch

    cond_ids = tokenizer(cond, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
    uncond_ids = tokenizer(uncond, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
    start = cond_ids.shape[1]

    def allowed(_batch_id, input_ids):
        return list(allowed_token_ids(input_ids.shape[0] - start, h, w, ids))

    sampling = dict(do_sample=True, top_k=top_k, temperature=temperature) if do_sample else dict(do_sample=False)
    with torch.no_grad():
        out = model.generate(input_ids=cond_ids, negative_prompt_ids=uncond_ids, guidance_scale=scale,
                             prefix_allowed_tokens_fn=allowed, max_new_tokens=max_new_tokens or num_image_tokens(h, w),
                             **sampling)
    return out[0, start:].tolist()


def hf_understand(model, processor, text: str, images: list, *, max_new_tokens: int,
                  min_new_tokens: int | None = None) -> list[int]:
    """Greedy answer ids for one prompt, built by transformers' `Emu3Processor`."""
    import torch

    prompt = understanding_prompt(text, len(images), image_token=processor.image_token, processor=processor)
    inputs = processor(text=[prompt], images=images or None, return_tensors="pt").to(model.device)
    extra = {"min_new_tokens": min_new_tokens} if min_new_tokens else {}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, **extra)
    return out[0, inputs["input_ids"].shape[1]:].tolist()
