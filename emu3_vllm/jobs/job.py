"""One generation job for every front end that writes images to disk: prompts -> plan -> streaming core -> sink.

- **Prompts**: any iterable, read lazily; a prompt file (`prompt_source.PromptFile`) is read again for each pass
  and never held whole. Item i gets the seed `seed + i` unless it sets its own, so a re-run, or a run after a kill,
  makes the same images.
- **Plan** (`GenerationJob(...)`, before any engine starts): every item checked once (`JobItem`), the output folder
  read, and each unit of work (an image in a folder of PNGs, a shard of webdataset) sorted into skipped (it exists
  and verifies), todo, corrupt (it exists but no longer verifies: made again) and changed (made with other
  settings: refused unless `regenerate_changed`). The resume rules are the sinks' `plan`.
- **Run**: the items still to make stream through `Emu3.iter_images`; a bad item goes to the sink as its failure
  and never to the engine; each result is written the moment it is decoded (`run_items`, which the Ray replicas
  run as well).
- **Sinks** only write and verify: `image_folder.ImageFolderSink` (PNGs + `manifest.jsonl`) and
  `webdataset.WebdatasetSink` (tar + parquet + stats per shard).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from emu3_vllm.cfg_pairs import ImageSpec
from emu3_vllm.jobs.files import ChangedSettingsError
from emu3_vllm.jobs.prompt_source import given_prompt


@dataclass(frozen=True)
class JobItem:
    """One index of a job: its spec, or why its input could not be turned into one."""

    index: int
    prompt: Any  # the prompt as given (`given_prompt`): what the record of a failed item shows
    spec: ImageSpec | None
    error: str | None = None


def job_items(prompts: Iterable[Any], defaults, seed: int) -> Iterator[JobItem]:
    """Each prompt checked, lazily: item i's seed is `seed + i` unless it sets one. `defaults` must be `checked()`."""
    from emu3_vllm.offline.items import ItemError, image_spec

    for index, prompt in enumerate(prompts):
        try:
            spec = image_spec(prompt, where=f"item {index}", defaults=defaults, seed=seed + index)
            yield JobItem(index, spec.prompt, spec)
        except ItemError as exc:
            yield JobItem(index, given_prompt(prompt), None, str(exc))


@dataclass
class Plan:
    """What a run does with each of its units (image indices, or shard numbers)."""

    unit: str  # "image" or "shard"
    todo: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    corrupt: list[int] = field(default_factory=list)  # on disk, but not what its record describes
    changed: dict[int, list[str]] = field(default_factory=dict)  # made with other settings: the fields that differ
    # Whether a unit to make holds an item the engine must draw (a unit of bad items only is written without one).
    todo_needs_engine: bool = False
    changed_needs_engine: bool = False

    def name(self, unit: int) -> str:
        return str(unit) if self.unit == "image" else f"{unit:05d}"

    def _shown(self, units: list[int], limit: int = 8) -> str:
        return ", ".join(map(self.name, units[:limit])) + (f" and {len(units) - limit} more" if len(units) > limit
                                                           else "")

    def describe_changed(self) -> str:
        fields = sorted({name for names in self.changed.values() for name in names})
        what = "image(s) made" if self.unit == "image" else "shard(s) with images made"
        return f"{len(self.changed)} {what} with other {', '.join(fields)}: {self._shown(sorted(self.changed))}"

    def notes(self) -> list[str]:
        """What this run redoes and why, one line each, for the user."""
        redo = "regenerating" if self.unit == "image" else "redoing"
        notes = [f"{redo} {self.describe_changed()}"] if self.changed else []
        if self.corrupt:
            what = ("image(s) whose file no longer matches the manifest" if self.unit == "image"
                    else "shard(s) whose files no longer match their stats")
            notes.append(f"{redo} {len(self.corrupt)} {what}: {self._shown(self.corrupt)}")
        return notes


class Sink(Protocol):
    """Where a job's images go; see `ImageFolderSink` and `WebdatasetSink`."""

    out: Any
    stats: dict

    def plan(self, items: Iterable[JobItem]) -> Plan: ...  # reads the folder; the only pass over the items
    def start(self, todo: list[int]) -> None: ...  # the units this run makes
    def wants(self, index: int) -> bool: ...
    def add(self, item: JobItem) -> None: ...  # an item this run makes, in index order, before its result
    def write(self, item: JobItem, result) -> None: ...
    def close(self) -> None: ...  # the run is over: everything added must have been written
    def discard(self) -> None: ...  # the run stopped early: drop what is half done
    def postfix(self) -> dict: ...  # for the progress bar


class GenerationJob:
    """Generating `prompts` into `sink`; see the module docstring. Everything that needs no engine happens in the
    constructor, so a front end can refuse before it starts one."""

    def __init__(self, prompts: Iterable[Any], sink: Sink, defaults, seed: int, *, regenerate_changed: bool = False):
        self.prompts = prompts
        self.sink = sink
        self.defaults = defaults
        self.seed = seed
        self.plan = sink.plan(self.items())
        if self.plan.changed and not regenerate_changed:
            fix = "replace them" if self.plan.unit == "image" else "redo those shards"
            raise ChangedSettingsError(f"{sink.out} already holds {self.plan.describe_changed()}; use another "
                                       f"--out, or --regenerate-changed to {fix}")
        self.todo = sorted(self.plan.todo + list(self.plan.changed))
        sink.start(self.todo)

    @property
    def stats(self) -> dict:
        return self.sink.stats

    @property
    def needs_engine(self) -> bool:
        return self.plan.todo_needs_engine or self.plan.changed_needs_engine

    def items(self) -> Iterator[JobItem]:
        return job_items(self.prompts, self.defaults, self.seed)

    def todo_items(self) -> Iterator[JobItem]:
        return (item for item in self.items() if self.sink.wants(item.index))

    def run(self, engine, *, max_in_flight: int | None = None, progress: bool = True,
            on_result: Callable[[int, Any], None] | None = None) -> dict:
        """Make what is left through `engine` (an `Emu3`; None when `needs_engine` is false). Returns the stats.
        A failed write (`WriteError`) stops the run there: everything finished so far stays in the folder and in
        the stats."""
        from tqdm import tqdm

        from emu3_vllm.offline.image_stream import StreamStats

        stream = StreamStats()
        total = self.stats["images"] - self.stats["skipped"]
        with tqdm(total=total, desc="images", unit="img", dynamic_ncols=True, disable=not progress or not total) as bar:
            def done(item: JobItem, result) -> None:
                bar.update(1)
                bar.set_postfix(**self.sink.postfix(), refresh=False)
                if on_result is not None:
                    on_result(item.index, result)

            try:
                run_items(engine, self.todo_items(), self.sink, max_in_flight=max_in_flight, stream=stream,
                          on_result=done)
            finally:
                seconds = time.perf_counter() - stream.started
                self.stats.update(seconds=round(seconds, 3),
                                  images_per_s=round(self.stats["written"] / seconds, 3) if seconds > 0 else None,
                                  decode_seconds=round(stream.decode_seconds, 3),
                                  mean_pairs_per_step=round(stream.mean_pairs_per_step, 2))
        return self.stats


class _Feed:
    """The items as the two lazily read iterables `Emu3.iter_images(specs, indices=...)` takes (it reads one spec,
    then its index); each item is added to the sink as it is read, and a bad one is written there at once."""

    def __init__(self, items: Iterable[JobItem], sink: Sink, on_result: Callable[[JobItem, Any], None]):
        self._items = items
        self._sink = sink
        self._on_result = on_result
        self._indices: deque[int] = deque()
        self.waiting: dict[int, JobItem] = {}

    def specs(self) -> Iterator[ImageSpec]:
        from emu3_vllm.offline.results import GeneratedImage

        for item in self._items:
            self._sink.add(item)
            if item.spec is None:
                result = GeneratedImage.failed(item.prompt, item.error)
                self._sink.write(item, result)
                self._on_result(item, result)
            else:
                self.waiting[item.index] = item
                self._indices.append(item.index)
                yield item.spec

    def indices(self) -> Iterator[int]:
        while True:
            yield self._indices.popleft()  # pushed just before its spec was handed out


def run_items(engine, items: Iterable[JobItem], sink: Sink, *, max_in_flight: int | None = None, stream=None,
              on_result: Callable[[JobItem, Any], None] | None = None) -> None:
    """Generate `items` (read lazily) through `engine` (an `Emu3`, or None when no item needs one) into `sink`.
    Whatever stops the run early discards what the sink holds half done."""
    from emu3_vllm.offline.image_stream import StreamStats

    def written(item: JobItem, result) -> None:
        if on_result is not None:
            on_result(item, result)

    feed = _Feed(items, sink, written)
    try:
        if engine is None:
            for spec in feed.specs():
                raise RuntimeError(f"{spec.prompt!r} needs an engine")
        else:
            # Closed on any exit (a failed write included), so the images still in the engine are aborted now
            # rather than whenever the generator is collected.
            with contextlib.closing(engine.iter_images(feed.specs(), indices=feed.indices(),
                                                       max_in_flight=max_in_flight,
                                                       stats=stream if stream is not None else StreamStats())) as out:
                for index, result in out:
                    item = feed.waiting.pop(index)
                    sink.write(item, result)
                    written(item, result)
        sink.close()
    finally:
        sink.discard()
