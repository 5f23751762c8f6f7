"""vLLM multimodal processor for Emu3: one `<image>` placeholder per image becomes Emu3's image span.

The span is `<|image start|>{h}*{w}<|image token|>` + h*(w+1) embedded positions (w visual tokens and an
end-of-line per row) + `<|extra_201|><|image end|>`, with (h, w) from transformers' `smart_resize` / 8,
exactly as transformers' `Emu3Processor` expands it. Only the h*(w+1) positions receive VQ embeddings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from functools import cached_property

import numpy as np
import torch
from transformers import BatchFeature, Emu3Config, Emu3Processor
from transformers.models.emu3.image_processing_emu3 import smart_resize
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.inputs import MultiModalDataDict, MultiModalInput
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    ProcessorInputs,
    PromptReplacement,
    PromptUpdate,
    PromptUpdateDetails,
    TimingContext,
)

# Processor kwarg carrying the size all images of one prompt are zero-padded to before VQ encoding.
# transformers' Emu3 image processor pads the images of a call to a common size and its VQ encoder sees the
# padding (its attention spans the whole map), so token parity needs the same padding. As a processor kwarg it
# also enters vLLM's per-item cache keys, so an image padded for one prompt is never reused for another.
PAD_TO_KWARG = "emu3_pad_to"


class Emu3ProcessingInfo(BaseProcessingInfo):
    def get_hf_config(self) -> Emu3Config:
        return self.ctx.get_hf_config(Emu3Config)

    def get_hf_processor(self, **kwargs: object) -> Emu3Processor:
        return self.ctx.get_hf_processor(Emu3Processor, **kwargs)

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    @cached_property
    def _image_processor(self):
        return self.get_hf_processor().image_processor

    @cached_property
    def spatial_factor(self) -> int:
        vq = self.get_hf_config().vq_config
        return 2 ** (len(vq.channel_multiplier) - 1)

    def get_resized_size(self, *, height: int, width: int) -> tuple[int, int]:
        """Pixel size the image processor resizes an image to (transformers' `smart_resize`)."""
        ip = self._image_processor
        return smart_resize(height, width, ip.spatial_factor, ip.min_pixels, ip.max_pixels)

    def get_token_grid(self, *, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of visual tokens for an image of the given pixel size."""
        h, w = self.get_resized_size(height=height, width=width)
        return h // self.spatial_factor, w // self.spatial_factor

    def get_num_image_tokens(self, *, height: int, width: int) -> int:
        """Prompt positions one image occupies, header and trailer included."""
        h, w = self.get_token_grid(height=height, width=width)
        return len(self.image_span_token_ids(h, w))

    @cached_property
    def image_token_id(self) -> int:
        return self.get_hf_config().vocabulary_map[self.get_hf_processor().image_token]

    def image_span_token_ids(self, h: int, w: int) -> list[int]:
        proc = self.get_hf_processor()
        vocab = self.get_hf_config().vocabulary_map
        return (
            [vocab[proc.image_start_token]]
            + self.get_tokenizer().encode(f"{h}*{w}", add_special_tokens=False)
            + [vocab[proc.fake_token_around_image]]
            + [self.image_token_id] * (h * (w + 1))
            + [vocab[proc.eof_token], vocab[proc.image_end_token]]
        )

    def get_largest_image_size(self) -> tuple[int, int]:
        side = int(self._image_processor.max_pixels**0.5)
        return self.get_resized_size(height=side, width=side)


class Emu3DummyInputsBuilder(BaseDummyInputsBuilder[Emu3ProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.get_hf_processor().image_token * mm_counts.get("image", 0)

    def get_dummy_mm_data(
        self, seq_len: int, mm_counts: Mapping[str, int], mm_options: MultiModalDummyOptions
    ) -> MultiModalDataDict:
        height, width = self.info.get_largest_image_size()
        return {
            "image": self._get_dummy_images(
                width=width, height=height, num_images=mm_counts.get("image", 0),
                overrides=mm_options.get("image"),
            )
        }


class Emu3MultiModalProcessor(BaseMultiModalProcessor[Emu3ProcessingInfo]):
    def apply(self, inputs: ProcessorInputs, timing_ctx: TimingContext) -> MultiModalInput:
        pad_to = self._common_pad_size(inputs.mm_data_items)
        if pad_to is not None:
            kwargs = {**inputs.hf_processor_mm_kwargs, PAD_TO_KWARG: pad_to}
            inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs)
        return super().apply(inputs, timing_ctx)

    def _common_pad_size(self, mm_items: MultiModalDataItems) -> tuple[int, int] | None:
        if "image" not in mm_items:
            return None
        images = mm_items.get_items("image", ImageProcessorItems)
        sizes = set()
        for i in range(len(images)):
            size = images.get_image_size(i)
            sizes.add(self.info.get_resized_size(height=size.height, width=size.width))
        if len(sizes) <= 1:
            return None
        return max(h for h, _ in sizes), max(w for _, w in sizes)

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        image_processor = self.info.get_hf_processor().image_processor
        images = hf_data.get("images") or []
        if not isinstance(images, (list, tuple)):
            images = [images]
        pixel_values, image_sizes = [], []
        for image in images:
            # Images arrive as height x width x channels. Left to guess, transformers reads an image 1 or 3 pixels
            # high as channels-first and fails (1 px) or silently mangles it (3 px).
            out = image_processor(images=[image], do_pad=False, return_tensors=None, input_data_format="channels_last")
            pixels = np.asarray(out["pixel_values"][0], dtype=np.float32)
            h, w = pixels.shape[-2:]
            pad_to = hf_kwargs.get(PAD_TO_KWARG)
            if pad_to is not None:
                ph, pw = pad_to
                # Bottom/right zeros after normalisation, as transformers' Emu3 image processor pads.
                pixels = np.pad(pixels, ((0, 0), (0, ph - h), (0, pw - w)))
            pixel_values.append(torch.from_numpy(pixels))
            image_sizes.append([h, w])
        return BatchFeature({"pixel_values": pixel_values, "image_sizes": torch.tensor(image_sizes, dtype=torch.long)})

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return dict(
            pixel_values=MultiModalFieldConfig.batched("image"),
            image_sizes=MultiModalFieldConfig.batched("image"),
        )

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        image_token_id = self.info.image_token_id

        def span(item_idx: int) -> PromptUpdateDetails:
            images = mm_items.get_items("image", ImageProcessorItems)
            size = images.get_image_size(item_idx)
            h, w = self.info.get_token_grid(height=size.height, width=size.width)
            return PromptUpdateDetails.select_token_id(
                self.info.image_span_token_ids(h, w), embed_token_id=image_token_id
            )

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=span)]
