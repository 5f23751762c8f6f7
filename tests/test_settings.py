"""The settings model is the input boundary: whatever a prompt line or a call holds, it becomes one item error naming
its field, or settings that every layer below can hold (vLLM's request checks, the CFG step's torch tensors, the
noise key, the shards' parquet columns). No engine starts here; the layers are the real ones."""

from __future__ import annotations

import json
import math
import sys

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from emu3_vllm.jobs.prompt_source import read_prompt_file
from emu3_vllm.offline.items import GenerationDefaults, ItemError, image_spec, image_specs
from emu3_vllm.settings import INT64_MAX, INT64_MIN, ImageSettings, SettingsError, image_settings

DEFAULTS = GenerationDefaults(height=16, width=16).checked()
KEYS = ["prompt", "height", "width", "cfg_scale", "seed", "negative_prompt", "colour", "text"]

# Values a user (or a fuzzer) can put in a JSON line, leaning on the edges: huge and negative integers, integral
# and fractional floats, NaN and infinities, bools, nulls, empty, blank and long strings, lone surrogates, nesting.
edge_ints = st.sampled_from([0, 1, -1, 7, 8, 16, 17, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, -(2**63),
                             -(2**63) - 1, 2**64 - 1, 2**64 + 5, 10**30])
scalars = st.one_of(st.none(), st.booleans(), st.integers(), edge_ints,
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e20, 1e300, 64.0, 0.5, -0.0]),
                    st.text(max_size=20), st.sampled_from(["", " ", "\ud800", "x" * 100_001, "3", "a red circle"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=5), inner, max_size=3), max_leaves=5)
lines = st.one_of(json_values, st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6),
                  st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=30)},
                                        optional={k: scalars for k in KEYS[1:6]}))

TRIED = {"lines": 0, "specs": 0, "errors": 0}


def _dump(value) -> str:
    try:
        return json.dumps(value)
    except ValueError:  # an int past Python's str() digit limit
        sys.set_int_max_str_digits(0)
        try:
            return json.dumps(value)
        finally:
            sys.set_int_max_str_digits(4300)


def _holds_downstream(spec) -> None:
    """What the engine and the writers do with an accepted spec, for real."""
    import pyarrow as pa
    import torch
    from vllm import SamplingParams

    from emu3_vllm.cfg_pairs import pair_half, pair_sampling_params
    from emu3_vllm.jobs.webdataset import MANIFEST_COLUMNS
    from emu3_vllm.kernels import pair_key
    from emu3_vllm.vllm_plugin.cfg_processor_v1 import Emu3CfgLogitsProcessor

    for params in pair_sampling_params(spec, "p0"):
        assert isinstance(params, SamplingParams)
        Emu3CfgLogitsProcessor.validate_params(params)  # vLLM calls this on every request it accepts
        half = pair_half(params)
        for value, dtype in ((half.top_k, torch.long), (half.key, torch.long), (half.h, torch.long),
                             (half.scale, torch.float32), (half.temperature, torch.float32)):
            assert torch.isfinite(torch.tensor([value], dtype=dtype)).all()
    assert 0 <= pair_key(spec.seed) < 2**32
    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in MANIFEST_COLUMNS])
    row = {"key": "000000000", "index": 0, "model": "m", **spec.record(), "error": None, "bytes": 1, "sha256": "0"}
    pa.Table.from_pylist([row], schema=schema)


@hsettings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(line=lines)
def test_any_prompt_line_is_one_error_naming_its_field_or_a_spec_every_layer_holds(line, tmp_path_factory):
    path = tmp_path_factory.mktemp("lines") / "prompts.jsonl"
    path.write_text(_dump(line) + "\n", encoding="utf-8", errors="surrogatepass")
    try:
        items = read_prompt_file(path)
    except ValueError as exc:  # a line the file reader refuses whole (not UTF-8: a lone surrogate written raw)
        assert str(path) in str(exc)
        return
    TRIED["lines"] += 1
    assert len(items) == 1
    try:
        spec = image_spec(items[0], where="item 0", defaults=DEFAULTS, seed=7)
    except ItemError as exc:
        TRIED["errors"] += 1
        message = str(exc)
        assert message.startswith("item 0: ") and exc.field is not None, message
        assert (exc.field in message or repr(exc.field) in message) and len(message) < 400, message
        if isinstance(line, dict):
            assert exc.field in line or exc.field in ("prompt", "height", "width"), (line, exc.field)
        return
    TRIED["specs"] += 1
    assert INT64_MIN <= spec.seed <= INT64_MAX and spec.h * spec.w >= 2
    _holds_downstream(spec)


def test_zz_report_examples_tried():
    print(f"\nhypothesis: {TRIED['lines']} prompt lines tried: {TRIED['specs']} specs, {TRIED['errors']} item errors")
    assert TRIED["lines"] >= 100


# What a parquet integer column can hold: int64, or uint64 past 2**63 - 1.
parquet_values = st.one_of(st.none(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
                           edge_ints.filter(lambda v: -(2**63) <= v < 2**64))


@hsettings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(seed=parquet_values, height=parquet_values, prompt=st.one_of(st.none(), st.text(max_size=10)))
def test_any_parquet_row_is_one_error_naming_its_field_or_a_spec(seed, height, prompt, tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path_factory.mktemp("rows") / "prompts.parquet"
    seed_type = pa.uint64() if isinstance(seed, int) and seed >= 2**63 else pa.int64()
    height_type = pa.uint64() if isinstance(height, int) and height >= 2**63 else pa.int64()
    table = pa.table({"prompt": pa.array([prompt], pa.string()), "seed": pa.array([seed], seed_type),
                      "height": pa.array([height], height_type)})
    pq.write_table(table, path)
    (item,) = read_prompt_file(path)
    try:
        spec = image_spec(item, where="item 0", defaults=DEFAULTS, seed=7)
    except ItemError as exc:
        assert exc.field in ("prompt", "seed", "height") and exc.field in str(exc)
        return
    _holds_downstream(spec)


@pytest.mark.parametrize("values, field, fragment", [
    ({"top_k": 2**63}, "top_k", "top_k must be <= 2147483647, got 9223372036854775808"),
    ({"seed": 2**64 + 5}, "seed", "seed must be <= 9223372036854775807"),
    ({"seed": 1e20}, "seed", "seed must be <= 9223372036854775807, got 1e+20"),
    ({"seed": 2**63}, "seed", "seed must be <= 9223372036854775807"),
    ({"negative_prompt": "x" * 200_000}, "negative_prompt", "longer than 100000 characters"),
    ({"height": 8, "width": 8}, "height", "a single 8x8 token"),
    ({"height": 4, "width": 4}, "height", "a single 8x8 token"),
    ({"cfg_scale": math.inf}, "cfg_scale", "finite"),
    ({"temperature": -1}, "temperature", ">= 0"),
    ({"seed": True}, "seed", "must be an integer, got True"),
])
def test_each_bound_names_its_field(values, field, fragment):
    with pytest.raises(SettingsError) as info:
        image_settings(prompt="a red circle", **values)
    assert info.value.field == field and fragment in str(info.value), str(info.value)


def test_a_5000_digit_seed_is_named_without_printing_it():
    sys.set_int_max_str_digits(0)
    big = int("9" * 5000)
    sys.set_int_max_str_digits(4300)
    with pytest.raises(SettingsError, match="seed must be <= 9223372036854775807, got an integer of 16610 bits"):
        image_settings(prompt="x", seed=big)


def test_the_extremes_are_accepted_and_8x16_is_the_smallest_image():
    for seed in (INT64_MIN, INT64_MAX):
        assert image_settings(prompt="x", seed=seed, height=8, width=16).grid == (1, 2)
    assert image_settings(prompt="x", top_k=-1).top_k == -1


def test_call_level_arguments_are_checked_before_any_work():
    with pytest.raises(ValueError, match="top_k must be <= 2147483647"):
        GenerationDefaults(top_k=2**63).checked()
    with pytest.raises(ValueError, match="seed must be <= 9223372036854775807"):
        next(image_specs(["x"], None, 2**63, DEFAULTS))
    with pytest.raises(ValueError, match="indices: 5 appears more than once"):
        next(image_specs(["a", "b", "c"], [5, 5, 2], 0, DEFAULTS))
    with pytest.raises(ValueError, match="indices: each index must be an integer >= 0, got -2"):
        next(image_specs(["a", "b", "c"], [5, 6, -2], 0, DEFAULTS))


def test_defaults_are_defined_once():
    fields = ImageSettings.model_fields
    defaults = GenerationDefaults()
    for name in ("height", "width", "cfg_scale", "negative_prompt", "positive_suffix", "top_k", "temperature"):
        assert getattr(defaults, name) == fields[name].default, name


def test_engine_arguments_are_checked_by_name_and_type_before_an_engine_starts():
    from emu3_vllm.engine import check_engine_kwargs

    assert check_engine_kwargs({"dtype": "float32", "max_num_seqs": 4}) == {"dtype": "float32", "max_num_seqs": 4}
    for kwargs, fragment in (({"seed": -1}, "seed must be >= 0, got -1"), ({"seed": 2**32}, "seed must be <="),
                             ({"dtype": "fp64"}, "dtype: Input should be"),
                             ({"num_gpu_blocks_override": "many"}, "num_gpu_blocks_override: Input should be"),
                             ({"no_such_argument": 1}, "no_such_argument: not a vLLM engine argument")):
        with pytest.raises(ValueError, match=fragment):
            check_engine_kwargs(kwargs)


def test_an_fp8_kv_cache_the_cpu_attention_cannot_hold_is_refused_before_an_engine_starts(tmp_path):
    """vLLM's CPU attention stores FP8 KV only with AVX-512 or AMX, and only for head sizes divisible by 32; it
    would say so from inside the started engine's worker. Here the answer is one line before anything starts."""
    from emu3_vllm import Emu3, make_random_checkpoint
    from emu3_vllm.engine import check_kv_cache, cpu_holds_fp8_kv, head_size

    odd = make_random_checkpoint(tmp_path / "h48", size="tiny", hidden_size=144, num_attention_heads=3,
                                 num_key_value_heads=1, write_weights=False)
    even = make_random_checkpoint(tmp_path / "h64", size="tiny", write_weights=False)
    assert head_size(str(odd)) == 48 and head_size(str(even)) % 32 == 0
    if cpu_holds_fp8_kv():
        with pytest.raises(ValueError, match="head size divisible by 32 for an FP8 KV cache, and .* has 48"):
            Emu3(odd, kv_cache_dtype="fp8")
        check_kv_cache(str(even), "fp8")
    else:  # this CPU: whatever the model, the CPU is the reason
        for model in (odd, even):
            with pytest.raises(ValueError, match="kv_cache_dtype fp8: .* only with AVX-512 or AMX, and this CPU has "
                                                 "neither; leave kv_cache_dtype at auto"):
                Emu3(model, kv_cache_dtype="fp8")
    check_kv_cache(str(odd), "auto")  # the model's own dtype needs nothing
    with pytest.raises(ValueError, match="kv_cache_dtype: Input should be"):
        Emu3(odd, kv_cache_dtype="fp9")
