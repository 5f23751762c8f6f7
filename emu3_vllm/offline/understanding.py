"""Image + text -> text: every item checked on its own, all good ones answered in one vLLM batch."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from emu3_vllm.offline.items import ItemError, UnderstandingItem, load_image, understanding_item
from emu3_vllm.offline.results import Answer
from emu3_vllm.offline.stepping import DataParallelLockstep, abort
from emu3_vllm.prompts import DEFAULT_SYSTEM_PROMPT, understanding_prompt

logger = logging.getLogger("emu3_vllm")


def build_prompt(item: UnderstandingItem, processor, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> str:
    """Emu3-Chat's prompt for one item, BOS included (the tokenizer does not add it): see `understanding_prompt`."""
    return processor.tokenizer.bos_token + understanding_prompt(
        item.text, len(item.images), image_token=processor.image_token, system_prompt=system_prompt,
        processor=processor)


def answer_items(llm, items: Sequence[Any], params, *, processor, system_prompt: str,
                 use_tqdm: bool) -> list[Answer]:
    """One `Answer` per item, in order; a bad item's answer is empty and carries the error naming it.

    Whatever interrupts the call (an exception, Ctrl-C) aborts the requests it enqueued, so the engine is left
    as it was.
    """
    answers: list[Answer | None] = [None] * len(items)
    enqueued: list[int] = []
    request_ids: list[str] = []
    try:
        for i, raw in enumerate(items):
            where = f"item {i}"
            try:
                item = understanding_item(raw, where)
                images = [load_image(img, f"{where}, image {j}") for j, img in enumerate(item.images)]
                try:
                    prompt = build_prompt(item, processor, system_prompt)
                except ValueError as exc:
                    raise ItemError(f"{where}: {exc}") from exc
                request = {"prompt": prompt}
                if images:
                    request["multi_modal_data"] = {"image": images}
                try:
                    request_ids += llm.enqueue(request, params, use_tqdm=False)
                except Exception as exc:  # vLLM's own validation: prompt length, image processing
                    raise ItemError(f"{where}: rejected by the engine: {exc}") from exc
                enqueued.append(i)
            except ItemError as exc:
                logger.warning("%s", exc)
                answers[i] = Answer(error=str(exc))
        # A data-parallel rank under vLLM's external launcher steps with the other ranks even with nothing to do.
        lockstep = DataParallelLockstep.of(llm) is not None
        outputs = llm.wait_for_completion(use_tqdm=use_tqdm) if enqueued or lockstep else []
    except BaseException:
        abort(llm.llm_engine, request_ids)
        raise
    if len(outputs) != len(enqueued):
        raise RuntimeError(f"engine returned {len(outputs)} outputs for {len(enqueued)} requests")
    for i, out in zip(enqueued, outputs):
        completion = out.outputs[0]
        answers[i] = Answer(completion.text, token_ids=completion.token_ids)
    return [a if a is not None else Answer(error=f"item {i}: no output") for i, a in enumerate(answers)]


def iter_items(items: Any) -> Iterable[Any]:
    """A single item (a text or a dict) as a list of one; anything else is a sequence of items."""
    return [items] if isinstance(items, (str, dict, UnderstandingItem)) else items
