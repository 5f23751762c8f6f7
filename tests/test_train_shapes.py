"""`scripts/train_shapes.py` at a few steps per stage, so the recipe cannot rot: a staged run (the VQ-VAE and the
text decoder loaded from their states, each polish run after) makes the same bytes as a run from scratch. The VQ
decoder's polish changes the VQ decoder only, so the visual tokens and the text decoder it leaves are the
unpolished run's bit for bit; the text decoder's polish changes the text decoder only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.env import subprocess_env
from safetensors.torch import load_file

pytestmark = pytest.mark.engine

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_shapes.py"
FEW_STEPS = ["--images", "300", "--decoder-crop-steps", "10", "--encoder-steps", "10", "--decoder-tune-steps", "10",
             "--text-steps", "3", "--text-polish-steps", "3", "--pairs", "4"]
# What the polish trains: the decoder, and the convolution in front of it. The encoder, its convolution and the
# codebook give the visual tokens.
DECODER = ("vqmodel.decoder.", "vqmodel.post_quant_conv.")
TEXT_DECODER = ("text_model.",)


def train(out: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *FEW_STEPS, *args], env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "emu3_vllm.json").read_text())["training"]


def changed_tensors(a: Path, b: Path) -> set[str]:
    before, after = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert before.keys() == after.keys()
    return {name for name in before if not before[name].equal(after[name])}


def test_a_staged_run_equals_a_run_from_scratch_and_each_polish_touches_only_its_decoder(tmp_path):
    states = ["--vq-state", str(tmp_path / "vq.pt"), "--text-state", str(tmp_path / "text.pt")]
    unpolished = train(tmp_path / "unpolished", "--decoder-polish-steps", "0", "--text-polish-steps", "0")
    vq_polished = train(tmp_path / "vq_polished", "--decoder-polish-steps", "10", "--text-polish-steps", "0")
    scratch = train(tmp_path / "scratch", "--decoder-polish-steps", "10", *states)
    assert (tmp_path / "vq.pt").exists() and (tmp_path / "text.pt").exists()
    staged = train(tmp_path / "staged", "--decoder-polish-steps", "10", *states)

    assert (tmp_path / "staged" / "model.safetensors").read_bytes() == \
        (tmp_path / "scratch" / "model.safetensors").read_bytes()
    assert staged["text_losses"] == scratch["text_losses"] == unpolished["text_losses"]
    assert staged["text_losses_polished"] == scratch["text_losses_polished"]
    assert unpolished["text_losses_polished"] is None
    assert vq_polished["vq"] == scratch["vq"]
    assert "decoder_mse_polished" in scratch["vq"] and "decoder_mse_polished" not in unpolished["vq"]
    for stage in ("vq decoder polish", "text decoder polish"):
        assert stage in staged["time"] and stage not in unpolished["time"]
    assert all(stage["processor"] for name, stage in scratch["time"].items() if name != "total")

    changed = changed_tensors(tmp_path / "unpolished", tmp_path / "vq_polished")
    assert changed and all(name.startswith(DECODER) for name in changed), sorted(changed)[:5]
    changed = changed_tensors(tmp_path / "vq_polished", tmp_path / "scratch")
    assert changed and all(name.startswith(TEXT_DECODER) for name in changed), sorted(changed)[:5]


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--decoder-polish-steps", "-1", "expected a step count of 0 or more, got -1"),
    ("--pairs", "0", "expected a count of 1 or more, got 0"),
])
def test_a_bad_count_is_refused_naming_its_flag(tmp_path, flag, value, message):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out"), flag, value],
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{flag}: {message}" in proc.stderr
    assert not (tmp_path / "out").exists()
