"""What the engine hands back: an understanding `Answer` and a `GeneratedImage`; each carries its own error."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


class Answer(str):
    """An understanding answer: the text itself, plus `error` (None when it succeeded) and `token_ids`."""

    error: str | None
    token_ids: tuple[int, ...]

    def __new__(cls, text: str = "", *, error: str | None = None, token_ids: Sequence[int] = ()):
        obj = super().__new__(cls, text)
        obj.error = error
        obj.token_ids = tuple(token_ids)
        return obj

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class GeneratedImage:
    """One text-to-image result: `image` (PIL) and `codes` (the (h, w) VQ code grid), or `error`.

    `spec` is what defined the image (`cfg_pairs.ImageSpec`); None when the input itself could not be read.
    """

    prompt: Any
    height: int | None
    width: int | None
    seed: int | None
    image: Any = None
    codes: list[list[int]] | None = None
    error: str | None = None
    spec: Any = None
    # Prompt tokens of both CFG halves, and how many of them vLLM's prefix cache served (the shared negative prompt).
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None

    @classmethod
    def of(cls, spec) -> GeneratedImage:
        return cls(prompt=spec.prompt, height=spec.height, width=spec.width, seed=spec.seed, spec=spec)

    @classmethod
    def failed(cls, prompt: Any, error: str) -> GeneratedImage:
        """An input that never became a spec: the prompt as given, and why."""
        if isinstance(prompt, dict):
            prompt = prompt.get("prompt", prompt)
        return cls(prompt=prompt, height=None, width=None, seed=None, error=error)
