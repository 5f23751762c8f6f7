"""Random checkpoints load in transformers with Emu3's tokens, and overrides reach every config."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from emu3_vllm import make_random_checkpoint


def _size_mb(path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def test_tiny_checkpoint_is_small_and_loads_in_transformers(tmp_path):
    from transformers import Emu3ForConditionalGeneration, Emu3Processor

    # Its size is what keeps building and loading it quick; a time limit would judge the machine, not the code.
    path = make_random_checkpoint(tmp_path / "tiny")
    assert _size_mb(path) < 20

    model = Emu3ForConditionalGeneration.from_pretrained(path)
    processor = Emu3Processor.from_pretrained(path)
    vocab = model.config.vocabulary_map
    tok = processor.tokenizer
    for token in ("<image>", "<|image start|>", "<|image end|>", "<|image token|>", "<|extra_200|>",
                  "<|extra_201|>", tok.bos_token, tok.eos_token):
        assert token in vocab
        assert tok.convert_tokens_to_ids(token) == vocab[token]
    visual = [name for name in vocab if name.startswith("<|visual token")]
    assert len(visual) == model.config.vq_config.codebook_size
    assert max(vocab.values()) < model.config.text_config.vocab_size
    # The tokenizer keeps Emu3's special tokens whole and does not add BOS by itself.
    ids = tok("<|image start|>3*4<|image token|>", add_special_tokens=True)["input_ids"]
    assert ids[0] == vocab["<|image start|>"] and ids[-1] == vocab["<|image token|>"]


def test_overrides_reach_text_vq_and_processor(tmp_path):
    from transformers import Emu3Config, Emu3Processor

    path = make_random_checkpoint(tmp_path / "var", hidden_size=192, num_hidden_layers=3, num_attention_heads=3,
                                  num_key_value_heads=1, codebook_size=300, base_channels=64, max_pixels=80 * 80)
    cfg = Emu3Config.from_pretrained(path)
    assert (cfg.text_config.hidden_size, cfg.text_config.num_hidden_layers, cfg.text_config.num_key_value_heads) \
        == (192, 3, 1)
    assert cfg.vq_config.codebook_size == 300 and cfg.vq_config.base_channels == 64
    assert cfg.vq_config.hidden_size == 64 * cfg.vq_config.channel_multiplier[-1]
    assert Emu3Processor.from_pretrained(path).image_processor.max_pixels == 80 * 80


def test_unknown_override_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown checkpoint override 'hiden_size'"):
        make_random_checkpoint(tmp_path / "bad", hiden_size=3)


@pytest.mark.engine  # runs the CLI
def test_8b_shape_has_the_released_emu3_ids(tmp_path):
    """Config, tokenizer and processor of the real shape (weights skipped: 16 GB)."""
    from transformers import Emu3Config, Emu3Processor

    out = tmp_path / "8b"
    subprocess.run([sys.executable, "-m", "emu3_vllm.cli", "make-checkpoint", str(out), "--size", "8b",
                    "--no-weights"], check=True)
    cfg = Emu3Config.from_pretrained(out)
    t = cfg.text_config
    assert (t.vocab_size, t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == \
        (184622, 4096, 32, 32, 8)
    assert cfg.vq_config.codebook_size == 32768
    vocab = cfg.vocabulary_map
    assert (t.pad_token_id, t.bos_token_id, t.eos_token_id) == (151643, 151849, 151850)
    assert vocab["<|extra_200|>"] == 151846 and vocab["<|extra_201|>"] == 151847
    assert vocab["<|image token|>"] == 151851 and vocab["<|visual token 000000|>"] == 151854
    assert Emu3Processor.from_pretrained(out).image_processor.max_pixels == 1024 * 1024
    assert json.loads((out / "emu3_vllm.json").read_text())["size"] == "8b"
