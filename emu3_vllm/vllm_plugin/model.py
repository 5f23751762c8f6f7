"""Emu3ForConditionalGeneration as a native vLLM model.

The text stack is vLLM's Llama (Emu3's decoder is a Llama: RMSNorm, SwiGLU, GQA, neox RoPE), so it gets vLLM's
paged attention, fused kernels and tensor-parallel sharding. Emu3 has no vision projector: an image is VQ-encoded
by transformers' own `Emu3VQVAE` encoder (kept inside the model, replicated across TP ranks), its codes are mapped
to visual-token ids through the checkpoint's `vocabulary_map`, an end-of-line column is appended, and the result
is looked up in the text embedding table.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import Emu3Config
from transformers.models.emu3.modeling_emu3 import Emu3ImageVocabularyMapping, Emu3VQVAE
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.sequence import IntermediateTensors

from emu3_vllm.vllm_plugin.processing import Emu3DummyInputsBuilder, Emu3MultiModalProcessor, Emu3ProcessingInfo

# Only the VQ encoder runs inside the engine; decoding images back to pixels happens outside it.
_VQ_DECODER_PREFIXES = ("vqmodel.decoder.", "vqmodel.post_quant_conv.")


@MULTIMODAL_REGISTRY.register_processor(
    Emu3MultiModalProcessor, info=Emu3ProcessingInfo, dummy_inputs=Emu3DummyInputsBuilder
)
class Emu3ForConditionalGeneration(nn.Module, SupportsMultiModal):
    # Marks this class as emu3_vllm's (tests check vLLM loaded it rather than its Transformers backend).
    emu3_vllm_native = True

    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }

    # Both layouts occur: transformers' in-memory names (`model.text_model.*`, `model.vqmodel.*`, `lm_head`) and
    # the serialized names transformers writes (`text_model.model.*`, `text_model.lm_head`, `vqmodel.*`).
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            "model.text_model.": "language_model.model.",
            "text_model.model.": "language_model.model.",
            "text_model.lm_head.": "language_model.lm_head.",
            "model.vqmodel.": "vqmodel.",
            "lm_head.": "language_model.lm_head.",
        }
    )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<image>"
        raise ValueError("Emu3 accepts images only")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: Emu3Config = vllm_config.model_config.hf_config
        self.config = config

        with self._mark_tower_model(vllm_config, "image"):
            self.vqmodel = Emu3VQVAE(config.vq_config)
            del self.vqmodel.decoder, self.vqmodel.post_quant_conv

        mapping = Emu3ImageVocabularyMapping(config.vocabulary_map)
        self.register_buffer("code_to_token_id", mapping.img2bpe_mapping_tensor.long(), persistent=False)
        self.eol_token_id = mapping.eol_token_id

        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=config.text_config,
                prefix=maybe_prefix(prefix, "language_model"),
                architectures=["LlamaForCausalLM"],
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    @torch.no_grad()
    def encode_images(self, pixel_values: list[torch.Tensor], image_sizes: torch.Tensor) -> list[torch.Tensor]:
        """VQ code grids (h, w) for preprocessed images; images of equal padded shape are encoded together."""
        grids: list[torch.Tensor | None] = [None] * len(pixel_values)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, pixels in enumerate(pixel_values):
            by_shape.setdefault(tuple(pixels.shape), []).append(i)
        for idxs in by_shape.values():
            batch = torch.stack([pixel_values[i] for i in idxs])
            sizes = image_sizes[idxs]
            out = self.vqmodel.encode(batch, sizes, return_dict=True)
            for i, grid in zip(idxs, out.image_tokens):
                grids[i] = grid
        return grids

    def image_token_ids(self, grid: torch.Tensor) -> torch.Tensor:
        """Flattened visual-token ids of one code grid, with the end-of-line column Emu3 puts after each row."""
        ids = self.code_to_token_id[grid.long()]
        eol = torch.full((ids.shape[0], 1), self.eol_token_id, dtype=ids.dtype, device=ids.device)
        return torch.cat([ids, eol], dim=1).flatten()

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        if isinstance(pixel_values, torch.Tensor):
            pixel_values = list(pixel_values)
        image_sizes = kwargs["image_sizes"]
        if isinstance(image_sizes, (list, tuple)):
            image_sizes = torch.stack([torch.as_tensor(s) for s in image_sizes])
        image_sizes = image_sizes.reshape(-1, 2).cpu()
        dtype = next(self.vqmodel.parameters()).dtype
        grids = self.encode_images([p.to(dtype) for p in pixel_values], image_sizes)
        embed = self.language_model.embed_input_ids
        return [embed(self.image_token_ids(grid)) for grid in grids]

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loader = AutoWeightsLoader(self, ignore_unexpected_prefixes=list(_VQ_DECODER_PREFIXES))
        return loader.load_weights(weights, mapper=self.hf_to_vllm_mapper)
