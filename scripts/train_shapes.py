"""Train the shapes checkpoint: a tiny Emu3 that sees and draws the world of `emu3_vllm.shapes.world`.

    python scripts/train_shapes.py [--out emu3_vllm/shapes/checkpoint] [--threads 2]

The result is an ordinary Emu3 checkpoint (config, tokenizer with Emu3's special and visual tokens,
`vocabulary_map`, processor config and chat template, weights) that transformers and emu3_vllm load. Training is
deterministic (fixed seeds, fixed thread count, fixed step counts) and runs on a CPU in minutes:

1. Visual tokens. An 8x8 patch of a world image is white, or one palette colour covering some part of the patch.
   The covers are clustered once into prototypes (k-means), and a patch's code is (colour, nearest prototype), so
   a code means the same thing wherever it appears: that keeps the drawing model's job small. transformers'
   `Emu3VQVAE` (x8 spatial factor) learns the rest: its decoder draws code grids (trained on crops, then whole
   images) and its encoder learns to give every patch its code under transformers' own quantizer (nearest
   codebook vector), with the codebook the decoder learned. The decoder is polished last, on the codes the
   encoder gives: that leaves the visual tokens as they are, so it sharpens drawings without retraining anything
   else.
2. The training images are encoded as at inference: transformers' `Emu3ImageProcessor` of the checkpoint, the
   trained encoder, codes to visual-token ids through `vocabulary_map` with an end-of-line after each row.
3. The text decoder (transformers' Emu3 text model) trains on token ids in Emu3's own layouts:
   - generation: `BOS caption POSITIVE_SUFFIX <|image start|>8*8<|image token|> image EOF EOI EOS`, exactly the
     prompt `Emu3.generate_images` builds, and the same image after the official negative prompt: the two halves
     of a CFG pair. The loss also scores the guided distribution at cfg 3 and 5, and the image the halves read
     has some codes recoloured, as a sampled slip would leave it (see `train_text`);
   - understanding: `BOS` + the chat prompt with the image span + the answer + EOS, in the layout the
     checkpoint's chat template renders (what `Emu3.understand` sends) and in Emu3's official-script layout.
   Images embed as the text-embedding lookup of their visual-token ids, which is what transformers and vLLM do at
   inference. Sequences that share a prefix (the 18 captions' prompts, the negative prompt, one image's span for
   its three questions) run it once per step: the prefix's keys and values are gathered for every continuation.
   A second, shorter cycle at a lower rate polishes it, reading shape slips too; like the VQ decoder's polish,
   it runs after a loaded state, so it can be added to a trained text decoder.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from emu3_vllm import shapes
from emu3_vllm.cfg_pairs import ImageSpec, PromptTokens, pair_prompts
from emu3_vllm.cli import int_at_least
from emu3_vllm.offline.items import UnderstandingItem
from emu3_vllm.offline.understanding import build_prompt
from emu3_vllm.prompts import NEGATIVE_PROMPT, POSITIVE_SUFFIX, understanding_prompt
from emu3_vllm.testing.checkpoints import IMAGE_TOKEN, make_random_checkpoint, visual_token

REPO = Path(__file__).resolve().parents[1]
COLOURS = list(shapes.PALETTE)
GRID = shapes.IMAGE_SIZE // 8  # 8x8 visual tokens per 64x64 image
INK = 128  # a pixel is the shape's when its darkest channel is below this (as shapes.non_white_mask)

# Model sizes. Text: head_dim 32 (vLLM's CPU attention has no smaller head size).
# Edge prototypes per colour: codebook = white + 6 colours x (full + 84 edges) = 511 codes. The decoder sees the
# neighbouring codes, so it draws edges more exactly than one prototype per patch could.
PROTOTYPES = 84
VQ = dict(embed_dim=16, latent_channels=16, base_channels=32, channel_multiplier=[1, 1, 1, 1], num_res_blocks=1,
          attn_resolutions=[], temporal_downsample_factor=1)
# Text loss: weights by the loss's name. Guided terms are per scale; their gradients reach the unconditional half
# multiplied by s - 1, so small weights suffice.
GUIDANCE = (3.0, 5.0)
LOSS_WEIGHTS = {"cond": 0.8, "uncond": 0.2, "guided_colour": 0.1, "guided_code": 0.02, "answer": 1.0,
                "understanding": 0.5}
SLIP_RATE = 0.08
# The text decoder's polish: a second cycle at a lower rate, in which this share of the coloured codes it reads
# take one of the NEAR_COVERS covers nearest their own (see `train_text`).
TEXT_POLISH_LR = 1e-3
COVER_SLIP_RATE = 0.06
NEAR_COVERS = 3
TEXT = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, initializer_range=0.02)


def log(msg: str) -> None:
    print(msg, flush=True)


def cpu_model() -> str:
    """The processor's name: stage times, and the weights' last bits, depend on it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Clock:
    """Wall and CPU seconds per stage (CPU time says what the run costs on a machine shared with other work), and
    the processor each stage ran on: a staged run can take its VQ-VAE or text decoder from another machine."""

    def __init__(self):
        self.stages: dict[str, dict[str, float]] = {}
        self._start = None

    def start(self, name: str) -> None:
        self._name, self._start = name, (time.perf_counter(), time.process_time())

    def stop(self) -> None:
        wall, cpu = time.perf_counter() - self._start[0], time.process_time() - self._start[1]
        self.stages[self._name] = {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "processor": cpu_model()}
        log(f"[{self._name}] {wall:.0f} s wall, {cpu:.0f} s CPU")

    def total(self) -> dict[str, float]:
        return {k: round(sum(s[k] for s in self.stages.values()), 1) for k in ("wall_s", "cpu_s")}


# ----------------------------------------------------------------------------------------------------------------
# The world as tensors, and its designed codes


def world_pixels(samples: list) -> torch.Tensor:
    """uint8 [N, 3, 64, 64]."""
    return torch.from_numpy(np.stack([np.asarray(s.image()) for s in samples])).permute(0, 3, 1, 2).contiguous()


def patch_covers(pixels: torch.Tensor) -> torch.Tensor:
    """[N, 8, 8, 64]: which of each patch's 64 pixels the shape covers (0/1), patches in row-major order."""
    ink = (pixels.min(1).values < INK).float()
    n = ink.shape[0]
    return ink.reshape(n, GRID, 8, GRID, 8).permute(0, 1, 3, 2, 4).reshape(n, GRID, GRID, 64)


def cover_prototypes(covers: torch.Tensor, count: int, seed: int, iters: int = 30) -> torch.Tensor:
    """[2 + count, 64]: empty, full, then k-means centres of the partly covered patches."""
    flat = covers.reshape(-1, 64)
    edge = flat[(flat.sum(1) > 0) & (flat.sum(1) < 64)]
    if len(edge) < count:
        raise ValueError(f"the images have {len(edge)} partly covered patches, fewer than the {count} prototypes")
    g = torch.Generator().manual_seed(seed)
    centres = edge[torch.randperm(len(edge), generator=g)[:count]].clone()
    for _ in range(iters):
        nearest = torch.cdist(edge, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, nearest, edge)
        counts = torch.bincount(nearest, minlength=count).float()
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
    return torch.cat([torch.zeros(1, 64), torch.ones(1, 64), centres])


def coloured_code(colour: torch.Tensor, cover: torch.Tensor, per_colour: int) -> torch.Tensor:
    """The code of a patch in palette colour `colour` with cover `cover` (0 full, 1.. edge prototypes); code 0
    is the white patch."""
    return 1 + colour * per_colour + cover


def code_colour_and_cover(code: torch.Tensor, per_colour: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `coloured_code`, for codes above 0."""
    return (code - 1) // per_colour, (code - 1) % per_colour


def designed_codes(covers: torch.Tensor, colour_index: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """[N, 8, 8] codes: 0 for a white patch, else the coloured code of its colour and nearest cover prototype."""
    per_colour = protos.shape[0] - 1
    n = covers.shape[0]
    nearest = torch.cdist(covers.reshape(n, -1, 64), protos.expand(n, -1, -1)).argmin(-1)
    codes = torch.where(nearest == 0, torch.zeros_like(nearest),
                        coloured_code(colour_index[:, None], nearest - 1, per_colour))
    return codes.reshape(n, GRID, GRID)


def nearest_covers(protos: torch.Tensor, count: int) -> torch.Tensor:
    """[covers, count]: each cover's `count` nearest other covers, numbered as `coloured_code` numbers them (0 full,
    1.. edge prototypes; `protos` also holds the empty cover first)."""
    covers = protos[1:]
    distance = torch.cdist(covers, covers)
    distance.fill_diagonal_(float("inf"))
    return distance.argsort(1)[:, :count]


def codebook_init(protos: torch.Tensor, dim: int) -> torch.Tensor:
    """Starting codebook: the patch's mean colour (3 dims) and the cover's principal components (the rest)."""
    per_colour = protos.shape[0] - 1
    basis = torch.linalg.svd(protos - protos.mean(0), full_matrices=False)[2][: dim - 3]
    palette = torch.tensor([shapes.PALETTE[c] for c in COLOURS]).float() / 255
    rows = [torch.cat([torch.ones(3), (protos[0] - protos.mean(0)) @ basis.T])]
    for colour in palette:
        for cover in protos[1:]:
            frac = cover.mean()
            rows.append(torch.cat([colour * frac + (1 - frac), (cover - protos.mean(0)) @ basis.T]))
    emb = torch.stack(rows)
    emb[:, :3] = (emb[:, :3] - 0.5) * 4
    assert emb.shape[0] == 1 + len(COLOURS) * per_colour
    return emb * 0.5


# ----------------------------------------------------------------------------------------------------------------
# VQ-VAE


def normalise(pixels: torch.Tensor, image_processor) -> torch.Tensor:
    """What the checkpoint's Emu3ImageProcessor does to a 64x64 image (no resize at this size): rescale, normalise."""
    mean = torch.tensor(image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(1, 3, 1, 1)
    return (pixels.float() * image_processor.rescale_factor - mean) / std


def cosine_lr(base: float, step: int, steps: int, warmup: int = 0) -> float:
    scale = min(1.0, (step + 1) / warmup) if warmup else 1.0
    return base * scale * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))


def adam_steps(params, lr: float, steps: int, seed: int):
    """Adam on the cosine schedule: yields (step, the run's random generator, the optimizer at the step's rate)."""
    opt = torch.optim.Adam(params, lr)
    rng = np.random.default_rng(seed)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(lr, step, steps)
        yield step, rng, opt


def train_decoder(vq, pixels, codes, image_processor, *, crop_steps: int, full_steps: int, batch: int, lr: float,
                  seed: int, codebook: bool = True) -> float:
    """Decoder (and, with `codebook`, the codebook) learn to draw code grids: 32x32 crops aligned to the token
    grid, then whole images."""
    skip = ("encoder.", "quant_conv.") if codebook else ("encoder.", "quant_conv.", "quantize.")
    steps = crop_steps + full_steps
    vq.train()
    loss = torch.tensor(0.0)
    for step, rng, opt in adam_steps([p for n, p in vq.named_parameters() if not n.startswith(skip)], lr, steps, seed):
        idx = rng.integers(0, len(pixels), batch)
        if step < crop_steps:
            ox, oy = rng.integers(0, GRID - 3, batch), rng.integers(0, GRID - 3, batch)
            x = torch.stack([pixels[i, :, 8 * y:8 * y + 32, 8 * c:8 * c + 32] for i, c, y in zip(idx, ox, oy)])
            grid = torch.stack([codes[i, y:y + 4, c:c + 4] for i, c, y in zip(idx, ox, oy)])
        else:
            x, grid = pixels[idx], codes[idx]
        loss = F.mse_loss(vq.decode(grid), normalise(x, image_processor))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            log(f"  decoder step {step + 1}/{steps}: mse {loss.item():.4f}")
    return loss.item()


def encoder_latents(vq, x: torch.Tensor) -> torch.Tensor:
    """[B, E, h, w] pre-quantization latents, as `Emu3VQVAE.encode` computes them for images."""
    hidden = vq.encoder(x.unsqueeze(1))
    return vq.quant_conv(hidden.permute(0, 2, 1, 3, 4))[:, :, 0]


def train_encoder(vq, pixels, codes, image_processor, *, steps: int, batch: int, lr: float, seed: int) -> float:
    """Encoder learns each patch's code under the nearest-codebook-vector rule, the codebook held fixed."""
    vq.quantize.embedding.weight.requires_grad_(False)
    codebook = vq.quantize.embedding.weight
    params = [p for n, p in vq.named_parameters() if n.startswith(("encoder.", "quant_conv."))]
    vq.train()
    loss = torch.tensor(0.0)
    for step, rng, opt in adam_steps(params, lr, steps, seed):
        idx = rng.integers(0, len(pixels), batch)
        z = encoder_latents(vq, normalise(pixels[idx], image_processor))
        z = z.permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])
        target = codes[idx].reshape(-1)
        dist = z.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * z @ codebook.T
        # Cross-entropy over negative distances makes the target the nearest vector with a margin; the pull keeps
        # latents on their codebook vector.
        loss = F.cross_entropy(-dist, target) + F.mse_loss(z, codebook[target])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0:
            acc = (dist.argmin(1) == target).float().mean().item()
            log(f"  encoder step {step + 1}/{steps}: loss {loss.item():.4f}, code accuracy {acc:.4f}")
    vq.quantize.embedding.weight.requires_grad_(True)
    return loss.item()


@torch.no_grad()
def encode_as_inference(vq, images: list, image_processor, vocab_mapping, batch: int = 256) -> torch.Tensor:
    """Visual-token ids [N, 8 * 9] (end-of-line after each row) exactly as transformers' Emu3 makes them: the
    checkpoint's image processor, `Emu3VQVAE.encode`, then `vocabulary_map`."""
    vq.eval()
    out = []
    for start in range(0, len(images), batch):
        inputs = image_processor(images=images[start:start + batch], return_tensors="pt")
        grids = vq.encode(inputs["pixel_values"], inputs["image_sizes"], return_dict=True).image_tokens
        # Per image, as Emu3Model.get_image_tokens does.
        out += [vocab_mapping.convert_img2bpe(grid).flatten().long() for grid in grids]
    return torch.stack(out)


def train_vq(vq, pixels, codes, protos, image_processor, mapping, samples, args, clock) -> tuple[dict, torch.Tensor]:
    """Decoder on the designed codes, encoder onto them, then the decoder on the codes the encoder gives.

    Returns the metrics and the training images' visual-token ids: the decoder's tuning leaves the encoder and
    the codebook as they are, so these are the ids the finished VQ-VAE gives."""
    clock.start("vq decoder")
    with torch.no_grad():
        vq.quantize.embedding.weight.copy_(codebook_init(protos, vq.config.embed_dim))
    decoder_mse = train_decoder(vq, pixels, codes, image_processor, crop_steps=args.decoder_crop_steps,
                                full_steps=args.decoder_full_steps, batch=16, lr=2e-3, seed=args.seed)
    clock.stop()
    clock.start("vq encoder")
    encoder_loss = train_encoder(vq, pixels, codes, image_processor, steps=args.encoder_steps, batch=32, lr=2e-3,
                                 seed=args.seed)
    image_ids = encode_as_inference(vq, [s.image() for s in samples], image_processor, mapping)
    encoded = mapping.convert_bpe2img(image_ids.reshape(-1, GRID, GRID + 1)).long()
    agreement = (encoded == codes).float().mean().item()
    log(f"  encoder gives the designed code for {agreement:.4f} of training patches")
    clock.stop()

    # The decoder then learns to draw the codes the encoder actually gives (whole images, lower rate): where the
    # encoder picks a neighbouring prototype, the decoder learns what that code stands for in practice.
    clock.start("vq decoder on encoder codes")
    tuned_mse = decoder_on_encoder_codes(vq, pixels, image_ids, image_processor, mapping,
                                         steps=args.decoder_tune_steps, lr=5e-4, seed=args.seed + 1)
    clock.stop()
    metrics = {"decoder_mse": round(decoder_mse, 4), "encoder_loss": round(encoder_loss, 4),
               "encoder_code_agreement": round(agreement, 4), "decoder_mse_on_encoder_codes": round(tuned_mse, 4)}
    return metrics, image_ids


def decoder_on_encoder_codes(vq, pixels, image_ids, image_processor, mapping, *, steps: int, lr: float,
                             seed: int) -> float:
    """The decoder (whole images) learns to draw the codes the encoder gives, `image_ids` as visual-token ids.

    The encoder and the codebook stay as they are, so `image_ids` (the visual tokens the text decoder learns)
    are still the ones this VQ-VAE gives, and the text decoder's training does not depend on this stage. It runs
    twice: tuning after the encoder is trained, then a longer polish at a lower peak rate, from which the tuned
    decoder still gains 1.1-1.4 dB of round-trip PSNR, and drawings lose over a third of their off-colour pixels."""
    encoded = mapping.convert_bpe2img(image_ids.reshape(-1, GRID, GRID + 1)).long()
    frozen = {n: p.detach().clone() for n, p in vq.named_parameters()
              if n.startswith(("encoder.", "quant_conv.", "quantize."))}  # what gives the visual tokens
    mse = train_decoder(vq, pixels, encoded, image_processor, crop_steps=0, full_steps=steps, batch=16, lr=lr,
                        seed=seed, codebook=False)
    assert all(torch.equal(p, frozen[n]) for n, p in vq.named_parameters() if n in frozen)
    return mse


@torch.no_grad()
def round_trip_psnr(vq, image_processor, fresh: list) -> tuple[float, float]:
    """decode(encode(image)) through transformers' Emu3VQVAE and image processor, as emu3_vllm runs them."""
    vq.eval()
    images = [s.image() for s in fresh]
    inputs = image_processor(images=images, return_tensors="pt")
    grids = torch.stack(vq.encode(inputs["pixel_values"], inputs["image_sizes"], return_dict=True).image_tokens)
    decoded = image_processor.postprocess(list(vq.decode(grids).float()), return_tensors="PIL.Image.Image")
    values = [shapes.psnr(a, b) for a, b in zip(images, decoded["pixel_values"])]
    return float(np.mean(values)), float(np.min(values))


# ----------------------------------------------------------------------------------------------------------------
# Text decoder


def shared_prefix_logits(lm, prefixes: list[list[int]], pidx: torch.Tensor, suffix: torch.Tensor, pad_id: int):
    """Logits of `suffix` rows [B, Ls] (right-padded with `pad_id`), each continuing the prefix `prefixes[pidx[b]]`.

    Every distinct prefix runs once (left-padded); its per-layer keys and values are gathered for the rows that
    continue it, so gradients reach the prefix through all of them. Equals running each row's full sequence.
    Returns (prefix hidden states [P, Lp, H], suffix logits [B, Ls, V]).
    """
    from transformers.cache_utils import DynamicCache

    width = max(map(len, prefixes))
    ids = torch.full((len(prefixes), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prefixes), width, dtype=torch.long)
    for i, prefix in enumerate(prefixes):
        ids[i, width - len(prefix):] = torch.tensor(prefix)
        mask[i, width - len(prefix):] = 1
    out = lm.model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=True)
    cache = DynamicCache(ddp_cache_data=[(layer.keys[pidx], layer.values[pidx])
                                         for layer in out.past_key_values.layers])
    lengths = mask.sum(1)[pidx]
    hidden = lm.model(input_ids=suffix, attention_mask=torch.cat([mask[pidx], (suffix != pad_id).long()], 1),
                      position_ids=lengths[:, None] + torch.arange(suffix.shape[1])[None], past_key_values=cache,
                      use_cache=True).last_hidden_state
    return out.last_hidden_state, lm.lm_head(hidden)


class Sequences:
    """Emu3's token layouts for this world, built from the checkpoint's tokenizer and processor."""

    def __init__(self, processor):
        tok = processor.tokenizer
        self.tok = tok
        vocab = tok.get_vocab()
        self.pad, self.eos = vocab[tok.pad_token], vocab[tok.eos_token]
        self.eof, self.eoi = vocab[tok.eof_token], vocab[tok.eoi_token]
        self.wrapper = vocab[tok.image_wrapper_token]

        def ids(text: str) -> list[int]:
            return tok.encode(text, add_special_tokens=False)

        self.ids = ids
        # What Emu3.generate_images sends for each half (its defaults): BOS + caption + positive suffix + header,
        # and BOS + negative prompt + header. Training prefixes stop before <|image token|>, whose position
        # predicts the first code.
        tokens = PromptTokens.from_tokenizer(tok)
        self.cond, self.uncond = {}, None
        for caption in shapes.all_captions():
            spec = ImageSpec(prompt=caption, h=GRID, w=GRID, cfg_scale=3.0, seed=0, negative_prompt=NEGATIVE_PROMPT,
                             positive_suffix=POSITIVE_SUFFIX, top_k=2048, temperature=1.0)
            cond, uncond = pair_prompts(spec, tokens)
            self.cond[caption], self.uncond = ids(cond), ids(uncond)
        for prompt in [*self.cond.values(), self.uncond]:
            assert prompt[-1] == self.wrapper
        # Understanding: the text around the image span, as Emu3.understand renders it through the checkpoint's
        # chat template, and in Emu3's official-script layout (what a checkpoint without a template gets).
        self.chat = {}
        for question in shapes.QUESTIONS:
            templated = build_prompt(UnderstandingItem(question, (None,)), processor)
            official = tok.bos_token + understanding_prompt(question, 1, image_token=IMAGE_TOKEN)
            for layout, text in (("template", templated), ("official", official)):
                before, after = text.split(IMAGE_TOKEN)
                self.chat[question, layout] = (ids(before), ids(after))
        self.span_head = ids(tok.boi_token + f"{GRID}*{GRID}" + tok.image_wrapper_token)
        befores = {tuple(before) for before, _ in self.chat.values()}
        assert len(befores) == 1, "the text before the image must not depend on the question or the layout"
        self.before_image = list(befores.pop())
        self.tail = torch.tensor([self.eof, self.eoi, self.eos])

    def image_suffix(self, image_ids: torch.Tensor) -> torch.Tensor:
        """<|image token|>, the image, EOF EOI EOS: what follows the generation prefix."""
        return torch.cat([torch.tensor([self.wrapper]), image_ids, self.tail])


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits, as emu3_vllm's CFG step guides them."""
    return uncond + scale * (cond - uncond)


def train_text(lm, seqs: Sequences, image_ids: torch.Tensor, samples: list, *, steps: int, pairs: int,
               und_batch: int, lr: float, seed: int, guidance: tuple[float, ...], weights: dict[str, float],
               guided_ramp: float, code_ids: torch.Tensor, per_colour: int, slip_rate: float,
               near_covers: torch.Tensor, cover_slip_rate: float) -> dict[str, float]:
    """Each step: `pairs` images, each continuing its caption's prompt and the negative prompt (the two halves of
    a CFG pair), and `und_batch` images with the three questions.

    The generation loss is cross-entropy of the conditional half, of the unconditional half, and two terms on the
    guided distribution at each scale in `guidance` (the next code under `uncond + s * (cond - uncond)`). Trained
    by maximum likelihood alone, the two halves disagree by noise on codes that neither should pick, and guidance
    multiplies that noise into blocks of other colours and ragged edges. The guided terms teach the unconditional
    half to carry the same noise, so that guidance cancels it:
    - `guided_colour`: the probability the guided distribution gives the target code's colour (white, the
      caption's colour, or a layout token), whichever code of that colour it picks;
    - `guided_code`: the guided distribution's cross-entropy on the target code itself, with a small weight.
    The colour term carries most of the weight because it asks the unconditional half for little: the weights
    are shared, and a large code-level term slows how fast the conditional half learns edges. The guided terms do
    not reach the conditional half directly (`cond.detach()`): it stays a maximum-likelihood model, which is what
    cfg 1 samples. They ramp in over the first `guided_ramp` of the steps, once both halves predict something.

    A drawing's own slips stay in its context: a sampled code is read by every later step. So the image the two
    halves read has slips, while the codes they must predict stay the clean image's:
    - a share `slip_rate` of the coloured codes have their colour swapped (same cover, other colour;
      `code_ids[code]` is a code's token, codes as `coloured_code` numbers them): both halves learn to carry on
      in the caption's colour;
    - then a share `cover_slip_rate` take one of their cover's nearest others (`near_covers[cover]`, same
      colour): a corner a little rounded, a side a little bent, meant to teach both halves to carry on in the
      caption's shape rather than the one the slip starts. A random other cover would be no slip a drawing makes, and
      costs shape scores. The polish reads these; the first cycle does not (a run reading them from the start
      drew no better)."""
    rng = np.random.default_rng(seed)
    code_of_token = torch.full((lm.config.vocab_size,), -1, dtype=torch.long)
    code_of_token[code_ids] = torch.arange(len(code_ids))
    # Colour of each token: 0 white, 1 + palette index for a coloured code, len(COLOURS) + 1 for the rest.
    colour_of_token = torch.full((lm.config.vocab_size,), len(COLOURS) + 1, dtype=torch.long)
    codes = torch.arange(len(code_ids))
    colour_of_token[code_ids] = torch.where(codes > 0, 1 + code_colour_and_cover(codes, per_colour)[0], 0)
    colour_onehot = F.one_hot(colour_of_token, len(COLOURS) + 2).float()
    layouts = random.Random(seed)
    opt = torch.optim.AdamW(lm.parameters(), lr, betas=(0.9, 0.98), weight_decay=0.01)
    vocab = lm.config.vocab_size
    lm.train()
    ema: dict[str, float] = {}

    def generation_losses(idx) -> dict[str, torch.Tensor]:
        # One forward for both halves: the distinct captions' prompts and the negative prompt are the prefixes.
        caps = [samples[i].caption for i in idx]
        distinct = sorted(set(caps))
        prefixes = [seqs.cond[c][:-1] for c in distinct] + [seqs.uncond[:-1]]
        pidx = torch.tensor([distinct.index(c) for c in caps] + [len(distinct)] * len(idx))
        suffix = torch.stack([seqs.image_suffix(image_ids[i]) for i in idx])
        read = suffix.clone()  # both halves read the same slips, as both read the same sampled codes
        code = code_of_token[read]
        slips = (code > 0) & torch.from_numpy(rng.random(read.shape) < slip_rate)
        colour, cover = code_colour_and_cover(code[slips], per_colour)
        other = (colour + torch.from_numpy(rng.integers(1, len(COLOURS), len(colour)))) % len(COLOURS)
        read[slips] = code_ids[coloured_code(other, cover, per_colour)]
        if cover_slip_rate:
            code = code_of_token[read]
            slips = (code > 0) & torch.from_numpy(rng.random(read.shape) < cover_slip_rate)
            colour, cover = code_colour_and_cover(code[slips], per_colour)
            near = near_covers[cover, torch.from_numpy(rng.integers(0, near_covers.shape[1], len(cover)))]
            read[slips] = code_ids[coloured_code(colour, near, per_colour)]
        _, logits = shared_prefix_logits(lm, prefixes, pidx, torch.cat([read, read]), seqs.pad)
        cond, uncond = logits[:, :-1].chunk(2)
        target = suffix[:, 1:].reshape(-1)

        def nll(x):
            return F.cross_entropy(x.reshape(-1, vocab), target)

        def colour_nll(x):
            # The probability the distribution gives the target's colour (white, a palette colour, or no code).
            colour_probs = x.reshape(-1, vocab).softmax(-1) @ colour_onehot
            return F.nll_loss(colour_probs.clamp_min(1e-12).log(), colour_of_token[target])

        losses = {"cond_image": nll(cond), "uncond_image": nll(uncond)}
        for scale in guidance:
            guided = guided_logits(cond.detach(), uncond, scale)
            losses[f"guided_colour_{scale:g}"] = colour_nll(guided)
            losses[f"guided_code_{scale:g}"] = nll(guided)
        return losses

    def understanding_loss(idx):
        prefixes, rows, targets = [], [], []
        for i in idx:
            span = seqs.span_head + image_ids[i].tolist() + [seqs.eof, seqs.eoi]
            prefixes.append(seqs.before_image + span[:-1])
            for question in shapes.QUESTIONS:
                layout = layouts.choice(("template", "official"))
                answer = seqs.ids(samples[i].answer(question)) + [seqs.eos]
                row = [span[-1]] + seqs.chat[question, layout][1] + answer
                rows.append(row)
                targets.append([-100] * (len(row) - 1 - len(answer)) + answer)
        width = max(map(len, rows))
        suffix = torch.full((len(rows), width), seqs.pad)
        target = torch.full((len(rows), width - 1), -100)
        for r, (row, t) in enumerate(zip(rows, targets)):
            suffix[r, :len(row)] = torch.tensor(row)
            target[r, :len(t)] = torch.tensor(t)
        pidx = torch.arange(len(idx)).repeat_interleave(len(shapes.QUESTIONS))
        prefix_hidden, logits = shared_prefix_logits(lm, prefixes, pidx, suffix, seqs.pad)
        answer_loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), target.reshape(-1), ignore_index=-100)
        # The image inside the prompt is also a sequence to model (each position predicts the next code).
        start = len(seqs.before_image) + len(seqs.span_head) - 1
        n = image_ids.shape[1]
        image_logits = lm.lm_head(prefix_hidden[:, start:start + n])
        image_target = torch.stack([torch.tensor(p[start + 1:start + 1 + n]) for p in prefixes])
        return answer_loss, F.cross_entropy(image_logits.reshape(-1, vocab), image_target.reshape(-1))

    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(lr, step, steps, warmup=50)
        losses = generation_losses(rng.integers(0, len(samples), pairs))
        losses["answer"], losses["understanding_image"] = understanding_loss(rng.integers(0, len(samples), und_batch))
        ramp = min(1.0, step / max(1.0, guided_ramp * steps)) if guided_ramp else 1.0
        loss = sum(next(w for key, w in weights.items() if name.startswith(key))
                   * (ramp if name.startswith("guided") else 1.0) * value for name, value in losses.items())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        for name, value in losses.items():
            ema[name] = value.item() if step == 0 else 0.95 * ema[name] + 0.05 * value.item()
        if (step + 1) % 50 == 0:
            log(f"  text step {step + 1}/{steps}: " + ", ".join(f"{k} {v:.3f}" for k, v in ema.items()))
    return {k: round(v, 4) for k, v in ema.items()}


# ----------------------------------------------------------------------------------------------------------------


# argparse types: a stage's step count (0 skips the stage), and a count the recipe divides by or draws from.
step_count = int_at_least(0, "a step count of 0 or more")
positive_count = int_at_least(1, "a count of 1 or more")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "emu3_vllm" / "shapes" / "checkpoint"))
    parser.add_argument("--threads", type=positive_count, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prototypes", type=positive_count, default=PROTOTYPES, help="edge prototypes per colour")
    parser.add_argument("--images", type=positive_count, default=12000, help="training images drawn from the world")
    parser.add_argument("--decoder-crop-steps", type=step_count, default=2000)
    parser.add_argument("--decoder-full-steps", type=step_count, default=0)
    parser.add_argument("--encoder-steps", type=step_count, default=400)
    parser.add_argument("--decoder-tune-steps", type=step_count, default=800)
    parser.add_argument("--decoder-polish-steps", type=step_count, default=1600,
                        help="a last decoder cycle at a lower rate; it runs after a VQ state is loaded too")
    parser.add_argument("--text-steps", type=step_count, default=1350)
    parser.add_argument("--text-polish-steps", type=step_count, default=1200,
                        help="a last text decoder cycle at a lower rate, reading shape slips; it runs after a text "
                        "state is loaded too")
    parser.add_argument("--text-lr", type=float, default=3e-3, help="text decoder peak learning rate")
    parser.add_argument("--pairs", type=positive_count, default=24,
                        help="CFG pairs (one image, both prompts) per text step")
    parser.add_argument("--vq-state", help="file keeping the trained VQ-VAE: loaded when it exists (to retrain only "
                        "the text decoder), written after training otherwise")
    parser.add_argument("--text-state", help="file keeping the trained text decoder (and the visual tokens it "
                        "learned): loaded when it exists, written after training otherwise")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="storage dtype of the weights (transformers and vLLM upcast bf16 for fp32 runs)")
    args = parser.parse_args(argv)
    if not 0 < args.text_lr <= 1:
        parser.error(f"--text-lr: expected a learning rate in (0, 1], got {args.text_lr}")

    from transformers import Emu3Config, Emu3ForConditionalGeneration, Emu3Processor, GenerationConfig
    from transformers.models.emu3.modeling_emu3 import Emu3ForCausalLM, Emu3ImageVocabularyMapping, Emu3VQVAE

    torch.set_num_threads(args.threads)
    # Bitwise repeatable: without this, threaded CPU kernels differ in the last bit between runs, and 900 steps
    # of training carry that into the weights.
    torch.use_deterministic_algorithms(True)
    # That mode also fills every new tensor with NaN, which no kernel here reads: 5 % of a text step, for nothing.
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    clock = Clock()
    codebook_size = 1 + len(COLOURS) * (args.prototypes + 1)

    clock.start("world")
    samples = shapes.samples(args.images, seed=args.seed + 1)
    pixels = world_pixels(samples)
    covers = patch_covers(pixels)
    try:
        protos = cover_prototypes(covers, args.prototypes, seed=args.seed)
    except ValueError as e:
        parser.error(f"--images {args.images} with --prototypes {args.prototypes}: {e}")
    codes = designed_codes(covers, torch.tensor([COLOURS.index(s.colour) for s in samples]), protos)
    clock.stop()

    # The checkpoint's config, tokenizer and processor come from the same builder as every checkpoint here.
    work = Path(tempfile.mkdtemp(prefix="emu3_shapes_"))
    skeleton = make_random_checkpoint(work / "ckpt", size="tiny", seed=args.seed, write_weights=False,
                                      codebook_size=codebook_size, **VQ, **TEXT)
    config = Emu3Config.from_pretrained(skeleton)
    processor = Emu3Processor.from_pretrained(skeleton)
    image_processor = processor.image_processor

    mapping = Emu3ImageVocabularyMapping(config.vocabulary_map)
    vq = Emu3VQVAE(config.vq_config)
    vq_state = Path(args.vq_state) if args.vq_state else None
    if vq_state is not None and vq_state.exists():
        saved = torch.load(vq_state)
        vq.load_state_dict(saved["vq"])
        vq_metrics = saved["metrics"]
        # The saved ids are those of the images the VQ-VAE was trained with; another --seed or --images draws
        # other images, whose ids this VQ-VAE must give afresh.
        image_ids = saved.get("image_ids") if saved.get("samples") == [args.seed + 1, args.images] else None
        clock.stages.update(saved["time"])  # what training it took, for the checkpoint's record
        log(f"VQ-VAE from {vq_state} (delete it to retrain)")
    else:
        vq_metrics, image_ids = train_vq(vq, pixels, codes, protos, image_processor, mapping, samples, args, clock)
        if vq_state is not None:
            torch.save({"vq": vq.state_dict(), "metrics": vq_metrics, "image_ids": image_ids,
                        "samples": [args.seed + 1, args.images],
                        "time": {k: v for k, v in clock.stages.items() if k.startswith("vq ")}}, vq_state)
    if image_ids is None:  # a VQ state saved without them, or for other images
        image_ids = encode_as_inference(vq, [s.image() for s in samples], image_processor, mapping)
    if args.decoder_polish_steps:
        clock.start("vq decoder polish")
        vq_metrics["decoder_mse_polished"] = round(decoder_on_encoder_codes(
            vq, pixels, image_ids, image_processor, mapping, steps=args.decoder_polish_steps, lr=3e-4,
            seed=args.seed + 2), 4)
        clock.stop()
    psnr = round_trip_psnr(vq, image_processor, shapes.samples(64, seed=args.seed + 2))
    log(f"  VQ round trip on 64 fresh images: PSNR mean {psnr[0]:.2f} dB, min {psnr[1]:.2f} dB")
    vq_metrics["fresh_round_trip_psnr_db"] = {"mean": round(psnr[0], 2), "min": round(psnr[1], 2)}

    text_config = config.text_config
    code_ids = torch.tensor([config.vocabulary_map[visual_token(code)] for code in range(codebook_size)])
    text_config.attention_dropout = 0.0  # transformers' Emu3 default is 0.1: slower, and no use in a short run
    text_config._attn_implementation = "sdpa"
    lm = Emu3ForCausalLM(text_config)
    seqs = Sequences(processor)
    text_recipe = dict(pairs=args.pairs, und_batch=8, guidance=GUIDANCE, weights=LOSS_WEIGHTS, slip_rate=SLIP_RATE,
                       near_covers=nearest_covers(protos, NEAR_COVERS), per_colour=args.prototypes + 1,
                       code_ids=code_ids)
    text_state = Path(args.text_state) if args.text_state else None
    if text_state is not None and text_state.exists():
        saved = torch.load(text_state)
        # The text decoder learned the visual tokens this VQ-VAE's encoder gives; another encoder's would not do.
        if not torch.equal(saved["image_ids"], image_ids):
            raise SystemExit(f"{text_state} was trained on other visual tokens than this VQ-VAE gives; delete it")
        lm.load_state_dict(saved["lm"])
        text_losses = saved["losses"]
        clock.stages["text decoder"] = saved["time"]  # what training it took, for the checkpoint's record
        log(f"text decoder from {text_state} (delete it to retrain)")
    else:
        clock.start("text decoder")
        text_losses = train_text(lm, seqs, image_ids, samples, steps=args.text_steps, lr=args.text_lr,
                                 seed=args.seed, guided_ramp=0.2, cover_slip_rate=0.0, **text_recipe)
        clock.stop()
        if text_state is not None:
            torch.save({"lm": lm.state_dict(), "losses": text_losses, "image_ids": image_ids,
                        "time": clock.stages["text decoder"]}, text_state)
    text_polish_losses = None
    if args.text_polish_steps:
        clock.start("text decoder polish")
        # Both halves already predict, so the guided terms count from the first step.
        text_polish_losses = train_text(lm, seqs, image_ids, samples, steps=args.text_polish_steps,
                                        lr=TEXT_POLISH_LR, seed=args.seed + 1, guided_ramp=0.0,
                                        cover_slip_rate=COVER_SLIP_RATE, **text_recipe)
        clock.stop()

    # Assemble the Emu3ForConditionalGeneration checkpoint from the two trained parts.
    model = Emu3ForConditionalGeneration(config).eval()
    model.model.vqmodel.load_state_dict(vq.state_dict())
    model.model.text_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    model.generation_config = GenerationConfig.from_pretrained(skeleton)
    model = model.to(getattr(torch, args.dtype))
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(skeleton, out)
    model.save_pretrained(out)
    meta = json.loads((out / "emu3_vllm.json").read_text())
    meta.update(size="shapes", seed=args.seed, training={
        "threads": args.threads, "images": args.images, "vq": vq_metrics, "text_losses": text_losses,
        "text_losses_polished": text_polish_losses,
        "time": {**clock.stages, "total": clock.total()}})
    (out / "emu3_vllm.json").write_text(json.dumps(meta, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    size_mb = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    log(json.dumps({"out": str(out), "size_mb": round(size_mb, 2), "vq": vq_metrics, "text_losses": text_losses,
                    "text_losses_polished": text_polish_losses,
                    "time": clock.total()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
