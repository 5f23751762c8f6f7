"""Reading what `generate` wrote back as a user would: a folder of PNGs with its manifest, or webdataset shards,
checking every guarantee of the layout on the way; and comparing the images with an engine's."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path


def read_manifest(out: str | Path, *, whole: bool = False) -> list[dict]:
    """A folder's manifest records in file order (a later line for an index replaces an earlier one).

    A line cut short by a kill is skipped, as a resume skips it, and a folder without a manifest has no records.
    With `whole` the manifest must exist and be nothing but complete JSON lines, each ending in a newline.
    """
    path = Path(out) / "manifest.jsonl"
    if whole:
        data = path.read_bytes()
        assert data.endswith(b"\n"), data[-200:]
        return [json.loads(line) for line in data.decode("utf-8").splitlines()]
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")  # a cut may split a character
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def assert_manifest_names_complete_files(out: Path) -> list[dict]:
    """Each index's latest line that names a PNG points to a file of the recorded size and hash that decodes whole.
    Returns the latest line of every index."""
    from PIL import Image

    records = list({r["index"]: r for r in read_manifest(out)}.values())
    for record in records:
        if "file" not in record:
            continue
        data = (out / record["file"]).read_bytes()
        assert len(data) == record["bytes"], record
        assert hashlib.sha256(data).hexdigest() == record["sha256"], record
        with Image.open(out / record["file"]) as image:
            image.load()
    return records


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


def image_pixels(encoded: bytes):
    """An encoded image file's RGB pixels as a numpy array."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(encoded)) as image:
        return np.asarray(image.convert("RGB"))


def assert_same_image(png: bytes, codes: list, expected, where) -> None:
    """The shard's image is `expected` (a single engine's `GeneratedImage` for the same spec): the same VQ codes and
    the same pixels, exactly (VQ decode runs in fixed batches on a fixed thread count, whichever process decodes)."""
    import numpy as np

    assert expected.error is None, expected.error
    assert codes == expected.codes, where
    assert np.array_equal(image_pixels(png), np.asarray(expected.image.convert("RGB"))), where
