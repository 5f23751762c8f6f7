"""Random-weight Emu3 checkpoints that transformers and emu3_vllm both load.

Real Emu3 weights live on a model hub we cannot reach from tests or CI, so tests, the demo and the
benchmarks build checkpoints locally: the real config classes, a byte-level tokenizer carrying all of
Emu3's special and visual tokens, `vocabulary_map`, and the processor config. Only the weights are random.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from emu3_vllm.prompts import EMU3_CHAT_TEMPLATE

# Emu3 names its reserved tokens <|extra_N|>; these are the ones with a role (HF conversion of Emu3-Chat/Gen).
EXTRA_TOKENS = 205
EOL_TOKEN = "<|extra_200|>"  # end of a row of visual tokens
EOF_TOKEN = "<|extra_201|>"  # end of frame
BOS_TOKEN = "<|extra_203|>"
EOS_TOKEN = "<|extra_204|>"
PAD_TOKEN = "<|endoftext|>"
IMAGE_TOKEN = "<image>"  # placeholder; takes the slot of <|extra_0|>
BOI_TOKEN = "<|image start|>"
EOI_TOKEN = "<|image end|>"
IMAGE_WRAPPER_TOKEN = "<|image token|>"
# Between <|endoftext|> and the extras in Emu3's vocabulary (so the extras start at 151646 in the real shape).
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")


def visual_token(code: int) -> str:
    return f"<|visual token {code:06d}|>"


@dataclass(frozen=True)
class CheckpointShape:
    text: dict[str, Any]
    vq: dict[str, Any]
    min_pixels: int
    max_pixels: int
    # Vocabulary slots before the special tokens: 256 byte tokens plus unreachable fillers, so that a
    # checkpoint of the real shape has the real token ids (pad 151643, vocab 184622).
    base_vocab: int = 256
    image_area: int = 518400


# The VQ-VAE of the CPU-sized checkpoints: a few hundred thousand parameters, Emu3's layout.
_SMALL_VQ = dict(embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 2, 2, 4], num_res_blocks=1,
                 attn_resolutions=[3], temporal_downsample_factor=4)

SHAPES: dict[str, CheckpointShape] = {
    # head_dim 32: vLLM's CPU attention supports no smaller head size.
    "tiny": CheckpointShape(
        # initializer_range 0.2: with the usual 0.02 a random model's greedy output is one token repeated,
        # which would make parity tests meaningless.
        text=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=2048, initializer_range=0.2),
        vq={**_SMALL_VQ, "codebook_size": 512},
        min_pixels=32 * 32, max_pixels=64 * 64, image_area=64 * 64,
    ),
    # ~100-300M parameters: big enough for CPU throughput ratios to mean something.
    "small": CheckpointShape(
        text=dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.2),
        vq={**_SMALL_VQ, "codebook_size": 4096},
        min_pixels=64 * 64, max_pixels=256 * 256, image_area=64 * 64,
    ),
    # The released Emu3-Chat/Gen shapes (transformers' Emu3 config defaults).
    "8b": CheckpointShape(
        text=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, max_position_embeddings=9216),
        vq=dict(codebook_size=32768),
        min_pixels=512 * 512, max_pixels=1024 * 1024, base_vocab=151643,
    ),
}


_TEXT_FIELDS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_parameters", "hidden_act",
    "attention_bias", "mlp_bias", "initializer_range",
}
_VQ_FIELDS = {
    "codebook_size", "embed_dim", "latent_channels", "double_latent", "in_channels", "out_channels",
    "temporal_downsample_factor", "base_channels", "channel_multiplier", "num_res_blocks", "attn_resolutions",
    "num_attention_heads", "attention_dropout", "hidden_size",
}
_PROCESSOR_FIELDS = {"min_pixels", "max_pixels", "image_area"}


def _split_overrides(overrides: dict[str, Any]) -> tuple[dict, dict, dict]:
    """Route `make_random_checkpoint` overrides to the text, VQ or processor config.

    `vq_`/`text_` prefixes disambiguate fields both configs have (e.g. `vq_num_attention_heads`).
    """
    text, vq, proc = {}, {}, {}
    for key, value in overrides.items():
        if key.startswith("vq_") and key[3:] in _VQ_FIELDS:
            vq[key[3:]] = value
        elif key.startswith("text_") and key[5:] in _TEXT_FIELDS:
            text[key[5:]] = value
        elif key in _PROCESSOR_FIELDS:
            proc[key] = value
        elif key in _TEXT_FIELDS:
            text[key] = value
        elif key in _VQ_FIELDS:
            vq[key] = value
        else:
            raise ValueError(
                f"unknown checkpoint override {key!r}; text fields: {sorted(_TEXT_FIELDS)}, "
                f"VQ fields: {sorted(_VQ_FIELDS)}, processor fields: {sorted(_PROCESSOR_FIELDS)}"
            )
    return text, vq, proc


def build_tokenizer(codebook_size: int, base_vocab: int = 256):
    """A byte-level tokenizer with Emu3's special tokens, reserved extras and visual tokens.

    It has no merges: any text tokenizes (one token per byte), which is all a random-weight model needs.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for i in range(len(vocab), base_vocab):
        vocab[f"\u0100filler{i}"] = i  # unreachable without merges; only reserves ids
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()

    # Emu3's order: with base_vocab=151643 this reproduces the released ids (BOS 151849, EOS 151850,
    # EOL 151846, EOF 151847, <|image token|> 151851, first visual token 151854, vocab 184622).
    specials = [PAD_TOKEN, *CHAT_TOKENS]
    specials += [IMAGE_TOKEN if k == 0 else f"<|extra_{k}|>" for k in range(EXTRA_TOKENS)]
    specials += [IMAGE_WRAPPER_TOKEN, BOI_TOKEN, EOI_TOKEN]
    specials += [visual_token(c) for c in range(codebook_size)]
    backend.add_special_tokens(specials)

    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
        extra_special_tokens={
            "image_token": IMAGE_TOKEN,
            "boi_token": BOI_TOKEN,
            "eoi_token": EOI_TOKEN,
            "image_wrapper_token": IMAGE_WRAPPER_TOKEN,
            "eof_token": EOF_TOKEN,
        },
    )


def make_random_checkpoint(path: str | os.PathLike, size: str = "tiny", seed: int = 0,
                           dtype: str | None = None, write_weights: bool = True, **config_overrides: Any) -> Path:
    """Write a random-weight Emu3 checkpoint to `path` and return it.

    `size`: "tiny" (seconds, a few MB; tests and the demo), "small" (CPU benchmarks) or "8b" (the real Emu3
    shapes, for GPU benchmarks). `config_overrides` reach the text config (`hidden_size`, `num_hidden_layers`,
    `num_key_value_heads`, ...), the VQ config (`codebook_size`, `base_channels`, ...; prefix `vq_`/`text_` where a
    field exists in both) and the image processor (`min_pixels`, `max_pixels`, `image_area`).
    `write_weights=False` writes everything but the weights (config, tokenizer, processor).
    """
    from transformers import Emu3Config, Emu3ImageProcessor, Emu3Processor, GenerationConfig

    if size not in SHAPES:
        raise ValueError(f"unknown checkpoint size {size!r}; choose one of {sorted(SHAPES)}")
    shape = SHAPES[size]
    text_over, vq_over, proc_over = _split_overrides(config_overrides)
    vq_kwargs = {**shape.vq, **vq_over}
    if "base_channels" in vq_kwargs and "hidden_size" not in vq_over:
        # The VQ middle blocks run at the last stage's width.
        vq_kwargs["hidden_size"] = vq_kwargs["base_channels"] * vq_kwargs["channel_multiplier"][-1]
    codebook_size = vq_kwargs.get("codebook_size", 32768)

    tokenizer = build_tokenizer(codebook_size, shape.base_vocab)
    vocab_map = dict(tokenizer.get_vocab())
    text_kwargs = {
        "vocab_size": max(vocab_map.values()) + 1,
        **shape.text,
        "bos_token_id": vocab_map[BOS_TOKEN],
        "eos_token_id": vocab_map[EOS_TOKEN],
        "pad_token_id": vocab_map[PAD_TOKEN],
        **text_over,
    }
    if text_kwargs["vocab_size"] <= max(vocab_map.values()):
        raise ValueError(f"vocab_size {text_kwargs['vocab_size']} is too small for {len(vocab_map)} tokens")

    # vocabulary_map is the whole vocabulary, as in the released checkpoints: the model finds <image>, EOL and
    # every <|visual token NNNNNN|> there.
    config = Emu3Config(vq_config=vq_kwargs, text_config=text_kwargs, vocabulary_map=vocab_map)
    config.architectures = ["Emu3ForConditionalGeneration"]

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    generation_config = GenerationConfig(
        bos_token_id=text_kwargs["bos_token_id"], eos_token_id=text_kwargs["eos_token_id"],
        pad_token_id=text_kwargs["pad_token_id"],
    )
    if write_weights:
        _write_random_weights(out, config, generation_config, seed, dtype, size)
    else:
        config.save_pretrained(out)
        generation_config.save_pretrained(out)
    image_processor = Emu3ImageProcessor(
        min_pixels=proc_over.get("min_pixels", shape.min_pixels),
        max_pixels=proc_over.get("max_pixels", shape.max_pixels),
    )
    processor = Emu3Processor(image_processor=image_processor, tokenizer=tokenizer)
    # Emu3-Chat-hf's chat template, saved as chat_template.jinja: vLLM's OpenAI server needs one for chat requests.
    processor.chat_template = EMU3_CHAT_TEMPLATE
    processor.save_pretrained(out)
    # Emu3's generation area (pixels); text-to-image prompts use it as their default size.
    meta = {"size": size, "seed": seed, "image_area": proc_over.get("image_area", shape.image_area)}
    (out / "emu3_vllm.json").write_text(json.dumps(meta, indent=2))
    return out


def _write_random_weights(out: Path, config, generation_config, seed: int, dtype: str | None, size: str) -> None:
    import torch
    from transformers import Emu3ForConditionalGeneration

    torch.manual_seed(seed)
    target_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                    None: torch.bfloat16 if size == "8b" else torch.float32}[dtype]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(target_dtype)
    try:
        model = Emu3ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    model.generation_config = generation_config
    model.save_pretrained(out)
