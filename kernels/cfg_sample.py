"""CFG combine + layout mask + top-k sampling for a batch of cond/uncond row pairs, in one launch.

For pair p (rows `cond_rows[p]`, `uncond_rows[p]` of `logits`):

    guided = log_softmax(u) + scale * (log_softmax(c) - log_softmax(u))    (full rows; -inf where either is)
    x      = guided[lo:hi] / temperature                                     (the visual-token slice: the mask)
    keep   = x >= the top_k-th largest x                                      (ties at the threshold stay)
    token  = lo + argmax(x + gumbel)     or lo + argmax(x) where temperature <= 0

Gumbel-max over the kept entries is an exact draw from softmax(x) restricted to them. The noise is a counter
hash of (pair key, position, column), not a stateful generator: a pair's draw depends on its seed and position
only, so an image never depends on what else is in the batch, and every row of a batch samples in one
vectorised pass. `cfg_sample_reference` defines the result; `cfg_sample_triton` computes the same in one
program per pair (equal up to float rounding in the log-sum-exp and the noise's logarithms).
"""

from __future__ import annotations

import os

import torch

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for 0 <= x < 2^32, split in 16-bit halves so no int64 product overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) of int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def pair_key(seed: int) -> int:
    """The 32-bit noise key of a seed (any Python int)."""
    s = int(seed) % 2**64
    t = torch.tensor([s & _MASK32, s >> 32], dtype=torch.int64)
    return int(mix32(t[0] ^ mix32(t[1])))


def _mix32_i32(x: torch.Tensor) -> torch.Tensor:
    """`mix32` on int32 tensors holding the same 32 bits: int32 products wrap and shifts are masked to act as
    logical shifts, so the bits equal `mix32`'s at half the memory traffic (the CPU hot path)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x7FEB352D
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * (0x846CA68B - 2**32)
    return x ^ ((x >> 16) & 0xFFFF)


def _as_i32(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) as the int32 with the same bits."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


_COLUMN_HASH: dict[tuple[int, str], torch.Tensor] = {}


def _column_hash(n: int, device: torch.device) -> torch.Tensor:
    key = (n, str(device))
    if key not in _COLUMN_HASH:
        _COLUMN_HASH[key] = _as_i32(mix32(torch.arange(n, dtype=torch.int64, device=device)))
    return _COLUMN_HASH[key]


def uniform_noise(key: torch.Tensor, position: torch.Tensor, n: int) -> torch.Tensor:
    """[P, n] floats in (0, 1): a pure function of (key[p], position[p], column).

    bits = mix32(mix32(key ^ mix32(position)) ^ mix32(column)); uniform = (bits >> 8 + 0.5) / 2^24.
    """
    row = _as_i32(mix32(key.long() ^ mix32(position.long() & _MASK32)))
    bits = _mix32_i32(row[:, None] ^ _column_hash(n, key.device)[None, :])
    return (((bits >> 8) & 0xFFFFFF).float() + 0.5) * 2.0**-24


def guided_logprobs(cond: torch.Tensor, uncond: torch.Tensor, scale: torch.Tensor, lo: int = 0,
                    hi: int | None = None) -> torch.Tensor:
    """[P, hi - lo] guided scores for P pairs of full cond/uncond logit rows, on columns [lo, hi); `scale` is [P].

    The log-softmax form of transformers' `UnbatchedClassifierFreeGuidanceLogitsProcessor` and Emu3's script
    (normalised over the whole vocabulary), -inf wherever either row is -inf (no NaN from -inf - -inf).
    """
    cond, uncond = cond.float(), uncond.float()
    c = cond[:, lo:hi] - torch.logsumexp(cond, dim=-1, keepdim=True)
    u = uncond[:, lo:hi] - torch.logsumexp(uncond, dim=-1, keepdim=True)
    guided = u + scale.to(c.dtype).reshape(-1, 1) * (c - u)
    # scale > 0: a -inf in c already gives -inf; a -inf in u gives NaN, which means -inf too.
    return torch.nan_to_num(guided, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))


def _effective_top_k(top_k: torch.Tensor, n: int) -> torch.Tensor:
    k = top_k.long()
    return torch.where((k <= 0) | (k > n), torch.full_like(k, n), k)


def cfg_sample_reference(logits: torch.Tensor, cond_rows: torch.Tensor, uncond_rows: torch.Tensor, lo: int, hi: int,
                         scale: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, key: torch.Tensor,
                         position: torch.Tensor) -> torch.Tensor:
    """[P] token ids in [lo, hi): the definition of the fused kernel, in plain torch (the CPU path)."""
    if cond_rows.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=logits.device)
    n = hi - lo
    x = guided_logprobs(logits[cond_rows], logits[uncond_rows], scale, lo, hi)
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    x = x / t[:, None]
    gumbel = -torch.log(-torch.log(uniform_noise(key, position, n)))
    score = torch.where(greedy[:, None], x, x + gumbel)
    pick = torch.argmax(score, dim=-1)
    # Top-k: keep x >= the k-th largest x. The unrestricted winner stands wherever fewer than k entries beat its
    # x (it is then inside the kept set, which it wins too); only the other rows need the threshold.
    k = _effective_top_k(top_k, n)
    beaten_by = (x > x.gather(1, pick[:, None])).sum(dim=-1)
    redo = (beaten_by >= k).nonzero().flatten()
    if redo.numel():
        xr, kr = x[redo], k[redo]
        # The k-th largest by selection (kthvalue: O(n) a row), once per distinct k; a top-k sort costs ~2x.
        kth = torch.empty_like(xr[:, :1])
        for k_value in kr.unique().tolist():
            rows = kr == k_value
            kth[rows] = torch.kthvalue(xr[rows], n - k_value + 1, dim=-1, keepdim=True).values
        pick[redo] = torch.argmax(score[redo].masked_fill(xr < kth, float("-inf")), dim=-1)
    return lo + pick


# ---------------------------------------------------------------------------------------------------------------
# Triton

try:  # Triton is optional: without it (or without a GPU) the reference runs.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


def triton_available() -> bool:
    """Triton can run here: a CUDA device, or Triton's CPU interpreter (TRITON_INTERPRET=1)."""
    if triton is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:
    @triton.jit
    def _mul32_t(x, c_lo: tl.constexpr, c_hi: tl.constexpr):
        return (x * c_lo + (((x * c_hi) & 0xFFFF) << 16)) & 0xFFFFFFFF

    @triton.jit
    def _mix32_t(x):
        x = x ^ (x >> 16)
        x = _mul32_t(x, 0x352D, 0x7FEB)
        x = x ^ (x >> 15)
        x = _mul32_t(x, 0xA68B, 0x846C)
        return x ^ (x >> 16)

    @triton.jit
    def _guided_t(c_row, u_row, cols, mask, lse_c, lse_u, s, t):
        c = tl.load(c_row + cols, mask=mask, other=float("-inf")).to(tl.float32) - lse_c
        u = tl.load(u_row + cols, mask=mask, other=float("-inf")).to(tl.float32) - lse_u
        finite = (c > float("-inf")) & (u > float("-inf")) & mask
        return tl.where(finite, (u + s * (c - u)) / t, float("-inf"))

    @triton.jit
    def _order_key(x):
        bits = x.to(tl.int32, bitcast=True)
        return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)

    @triton.jit
    def _lse_t(row, vocab, BLOCK: tl.constexpr):
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, vocab, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(row + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
            new_m = tl.maximum(m, x)
            alive = new_m > float("-inf")
            acc = tl.where(alive, acc * tl.exp(m - new_m) + tl.exp(x - new_m), acc)
            m = new_m
        top = tl.max(m, axis=0)
        total = tl.sum(tl.where(m > float("-inf"), acc * tl.exp(m - top), 0.0), axis=0)
        return top + tl.log(total)

    @triton.jit
    def cfg_sample_kernel(logits_ptr, stride_row, cond_rows_ptr, uncond_rows_ptr, vocab, lo, n,
                          scale_ptr, temp_ptr, topk_ptr, key_ptr, pos_ptr, out_ptr, BLOCK: tl.constexpr):
        p = tl.program_id(0)
        c_row = logits_ptr + tl.load(cond_rows_ptr + p).to(tl.int64) * stride_row
        u_row = logits_ptr + tl.load(uncond_rows_ptr + p).to(tl.int64) * stride_row
        s = tl.load(scale_ptr + p).to(tl.float32)
        t = tl.load(temp_ptr + p).to(tl.float32)
        greedy = t <= 0.0
        t = tl.where(greedy, 1.0, t)
        k = tl.load(topk_ptr + p).to(tl.int64)
        k = tl.where((k <= 0) | (k > n), n, k)
        pkey = tl.load(key_ptr + p).to(tl.int64)
        pos = tl.load(pos_ptr + p).to(tl.int64) & 0xFFFFFFFF
        row_hash = _mix32_t(pkey ^ _mix32_t(pos))

        lse_c = _lse_t(c_row, vocab, BLOCK)
        lse_u = _lse_t(u_row, vocab, BLOCK)
        c_row = c_row + lo
        u_row = u_row + lo

        # The top_k-th largest x, exactly: bisection over the order-preserving integer image of the floats.
        low = k * 0 - 2147483648
        high = k * 0 + 2147483648
        iterations = tl.where(greedy | (k >= n), 0, 32)
        for _ in range(iterations):
            mid = (low + high) >> 1
            count = tl.zeros([BLOCK], tl.int32)
            for start in range(0, n, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                mask = cols < n
                x = _guided_t(c_row, u_row, cols, mask, lse_c, lse_u, s, t)
                count += ((_order_key(x) >= mid) & mask).to(tl.int32)
            enough = tl.sum(count, axis=0) >= k
            low = tl.where(enough, mid, low)
            high = tl.where(enough, high, mid)

        best = tl.full([BLOCK], float("-inf"), tl.float32)
        best_col = tl.zeros([BLOCK], tl.int64)
        for start in range(0, n, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n
            x = _guided_t(c_row, u_row, cols, mask, lse_c, lse_u, s, t)
            bits = _mix32_t(row_hash ^ _mix32_t(cols.to(tl.int64)))
            uniform = ((bits >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # 2**-24
            gumbel = -tl.log(-tl.log(uniform))
            score = tl.where(greedy, x, x + gumbel)
            score = tl.where(mask & (_order_key(x) >= low), score, float("-inf"))
            better = score > best  # strict: the earliest column wins a tie, as torch.argmax
            best_col = tl.where(better, cols.to(tl.int64), best_col)
            best = tl.where(better, score, best)
        top = tl.max(best, axis=0)
        col = tl.min(tl.where(best == top, best_col, n), axis=0)
        tl.store(out_ptr + p, lo + col)



def cfg_sample_triton(logits: torch.Tensor, cond_rows: torch.Tensor, uncond_rows: torch.Tensor, lo: int, hi: int,
                      scale: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, key: torch.Tensor,
                      position: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """`cfg_sample_reference` as one Triton program per pair."""
    pairs = cond_rows.numel()
    out = torch.empty(pairs, dtype=torch.long, device=logits.device)
    if pairs == 0:
        return out
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if triton is None:
        raise RuntimeError("cfg_sample_triton needs the triton package")
    cfg_sample_kernel[(pairs,)](
        logits, logits.stride(0), cond_rows.contiguous(), uncond_rows.contiguous(), logits.shape[1], lo, hi - lo,
        scale.float().contiguous(), temperature.float().contiguous(), top_k.long().contiguous(),
        key.long().contiguous(), position.long().contiguous(), out, BLOCK=block,
    )
    return out


def cfg_sample(logits: torch.Tensor, cond_rows: torch.Tensor, uncond_rows: torch.Tensor, lo: int, hi: int,
               scale: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, key: torch.Tensor,
               position: torch.Tensor) -> torch.Tensor:
    """The fused kernel on CUDA when Triton is there, the torch reference otherwise.

    `EMU3_VLLM_CFG_KERNEL=reference|triton` forces one (for benchmarks and debugging).
    """
    choice = os.environ.get("EMU3_VLLM_CFG_KERNEL", "auto")
    if choice not in ("auto", "reference", "triton"):
        raise ValueError(f"EMU3_VLLM_CFG_KERNEL must be auto, reference or triton, got {choice!r}")
    use_triton = choice == "triton" or (choice == "auto" and logits.is_cuda and triton_available())
    fn = cfg_sample_triton if use_triton else cfg_sample_reference
    return fn(logits, cond_rows, uncond_rows, lo, hi, scale, temperature, top_k, key, position)
