"""Reading a folder of webdataset shards back as a user would, checking every guarantee of the layout on the way."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path


def read_shards(out: Path) -> dict[int, dict]:
    """Every finished shard's items by index: its manifest row, its JSON member, its PNG bytes and VQ codes (None
    if it failed).

    Checks that each shard's files are those its stats describe, that every index appears once across all shards,
    that each tar holds exactly the members its manifest lists, and that no temporary file is left behind.
    """
    import numpy as np
    import pyarrow.parquet as pq

    items: dict[int, dict] = {}
    for stats_path in sorted(out.glob("*_stats.json")):
        stats = json.loads(stats_path.read_text())
        name = stats_path.name.split("_", 1)[0]
        for kind in ("tar", "parquet"):
            data = (out / f"{name}.{kind}").read_bytes()
            assert stats["files"][kind] == {"name": f"{name}.{kind}", "bytes": len(data),
                                            "sha256": hashlib.sha256(data).hexdigest()}, (name, kind)
        rows = pq.read_table(out / f"{name}.parquet").to_pylist()
        assert len(rows) == stats["count"] and stats["successes"] + stats["failed"] == stats["count"], stats
        members: dict[str, bytes] = {}
        with tarfile.open(out / f"{name}.tar") as tar:
            for member in tar.getmembers():
                assert member.name not in members, (name, member.name)
                members[member.name] = tar.extractfile(member).read()
        for row in rows:
            assert row["index"] not in items, f"index {row['index']} is in two shards"
            assert row["key"] == f"{row['index']:09d}"
            meta = json.loads(members.pop(f"{row['key']}.json"))
            png = members.pop(f"{row['key']}.png", None)
            codes = members.pop(f"{row['key']}.codes.npy", None)
            if row["error"] is None:
                assert png is not None and len(png) == row["bytes"], row
                assert hashlib.sha256(png).hexdigest() == row["sha256"]
                codes = np.load(io.BytesIO(codes)).tolist()
                assert (len(codes), len(codes[0])) == (row["height"] // 8, row["width"] // 8), row
            else:
                assert png is None and codes is None and meta["error"] == row["error"], row
            assert {k: meta[k] for k in ("prompt", "seed", "height", "width", "cfg_scale", "error") if k in meta} == \
                {k: row[k] for k in ("prompt", "seed", "height", "width", "cfg_scale", "error") if k in meta}
            items[row["index"]] = {"shard": stats["shard"], "row": row, "meta": meta, "png": png, "codes": codes}
        assert not members, f"{name}.tar holds {sorted(members)} that its manifest does not list"
    assert not list(out.glob(".*.tmp")), list(out.glob(".*.tmp"))
    return items


def pixels(png: bytes):
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def assert_same_image(png: bytes, codes: list, expected, where) -> None:
    """The shard's image is `expected` (a single engine's `GeneratedImage` for the same spec): the same VQ codes and
    the same pixels, exactly (VQ decode runs in fixed batches on a fixed thread count, whichever process decodes)."""
    import numpy as np

    assert expected.error is None, expected.error
    assert codes == expected.codes, where
    assert np.array_equal(pixels(png), np.asarray(expected.image.convert("RGB"))), where
