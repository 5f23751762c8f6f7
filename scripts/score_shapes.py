"""Score a shapes checkpoint on fresh seed sets: what it draws at CFG 1, 3 and 5, what it answers, its VQ round
trip and visual chain of thought (`emu3_vllm.shapes.scores`), one column per seed set and the spread between them.

    python scripts/score_shapes.py [--checkpoint DIR] [--seed-base 7000 --seed-base 107000] [--out scores.json]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def flatten(scores: dict, prefix: str = "") -> dict[str, float]:
    flat = {}
    for key, value in scores.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        elif key != "seed_base":
            flat[f"{prefix}{key}"] = value
    return flat


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a shapes checkpoint directory (default: the one that ships)")
    parser.add_argument("--seed-base", type=int, action="append", help="one seed set per use (default: 7000 and "
                        "107000; tests/test_shapes.py scores 7000)")
    parser.add_argument("--out", help="JSON file for the scores")
    args = parser.parse_args(argv)

    # The round trip reads the engine's own VQ encoder, a function vLLM pickles to its workers.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from emu3_vllm import Emu3, shapes_checkpoint
    from emu3_vllm.shapes.scores import SeedSet, score_all

    bases = args.seed_base or [7000, 107000]
    engine = Emu3(args.checkpoint or shapes_checkpoint(), dtype="float32", max_model_len=1024, max_num_seqs=64)
    try:
        runs = [score_all(engine, SeedSet(base)) for base in bases]
    finally:
        engine.close()
    flat = [flatten(run) for run in runs]
    print(f"{'score':40s}" + "".join(f"{'seeds ' + str(b):>14s}" for b in bases) + f"{'spread':>10s}")
    for key in flat[0]:
        values = [f[key] for f in flat]
        print(f"{key:40s}" + "".join(f"{v:14.3f}" for v in values) + f"{max(values) - min(values):10.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"checkpoint": str(args.checkpoint or shapes_checkpoint()),
                                              "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
