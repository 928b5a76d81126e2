"""Streaming WebDataset shards with the ``webdataset`` library: object storage, node and worker
splitting, resampling.

:class:`StreamingShardDataset` is an ``IterableDataset`` over shard URLs in the layout of
:mod:`loupe.data.formats` (``<key>.png|jpg|jpeg|webp`` + ``<key>.txt`` + optional ``<key>.json``).
A URL spec is anything ``webdataset`` opens, brace-expanded and ``::``-separated:

- local shards: a path, a directory, a glob or a ``{000..009}`` range (as :class:`ShardDataset`);
- ``pipe:`` commands, whose stdout is the shard: ``pipe:aws s3 cp s3://bucket/shard-{000..099}.tar -``,
  ``pipe:cat shard-000.tar``;
- ``http://``, ``https://`` (read with ``curl``), ``gs://`` and the other ``webdataset`` schemes.

Reading: shards are dealt to nodes (``rank::world_size``) and then to DataLoader workers
(``worker::num_workers``); a rank or worker with no shard yields nothing, so use at least
``world_size * num_workers`` shards. With ``resampled=True`` every worker instead draws shards
with replacement, forever (an infinite stream; cut it with ``samples_per_epoch`` or by counting
steps), seeded by ``(seed, epoch, rank, worker)``.

Bad input is skipped and counted as in :class:`ShardDataset`, with the same checks
(:func:`loupe.data.formats.sample_fields`, :func:`loupe.data.formats.decode_sample`): an unreadable
shard or ``pipe:`` command, a truncated tar (``read_error``), a sample without an image or caption,
an empty caption, an invalid ``.json`` sidecar, an undecodable image, a box outside the image.
``webdataset`` is given a handler that counts and warns instead of raising. The counts are shared
with the DataLoader workers: ``dataset.skipped`` and ``dataset.skip_counts`` in the main process
include what the workers skipped. Unlike the map-style reader, a bad sample is dropped in the
worker (never yielded as None), so batches stay full.

Order and resuming: the stream is a pure function of ``(seed, epoch, rank, world_size, worker,
num_workers)`` and the shards' contents (shard order: a seeded permutation per epoch when
``shard_shuffle``; sample order: a seeded ``webdataset`` shuffle buffer; resampled draws: seeded).
It has no random access, so a resumed run does not replay the exact samples: set the epoch
(:meth:`StreamingShardDataset.set_epoch`) to the epoch being resumed (finite streams restart it
from its first shard) or, for resampled streams, to the step resumed at (a fresh, deterministic
draw). Exact resume needs the map-style :class:`ShardDataset` (local shards).
"""
from __future__ import annotations

import re
import sys
import warnings
from functools import partial
from itertools import islice

import torch

from .formats import SKIP_KINDS, SampleProblem, decode_sample, expand_paths, sample_fields
from .pipeline import Preprocess

__all__ = ["StreamingShardDataset", "expand_urls", "is_url", "SKIP_KINDS"]

_COUNT_ROWS = 65  # workers beyond 64 share rows (their counts may then race)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # two letters at least: not a Windows drive


def _wds():
    try:
        import webdataset
    except ImportError as e:  # a runtime dependency; named for installs that skipped it
        raise ImportError("loupe.data streaming needs the webdataset package: pip install webdataset") from e
    return webdataset


def is_url(spec: str) -> bool:
    """Whether ``spec`` is a URL or a ``pipe:`` command rather than a local path."""
    return bool(_SCHEME.match(spec))


def expand_urls(spec: str | list[str]) -> list[str]:
    """The shard URLs of a spec: a list, a ``::``-separated list, brace ranges (``webdataset``'s
    expansion for URLs and ``pipe:`` commands), and for local paths also directories and globs
    (:func:`loupe.data.formats.expand_paths`)."""
    if isinstance(spec, (list, tuple)):
        return [u for s in spec for u in expand_urls(s)]
    spec = str(spec)
    if "::" in spec:
        return expand_urls(spec.split("::"))
    if is_url(spec):
        return list(_wds().shardlists.expand_urls(spec))
    return expand_paths(spec, (".tar", ".tar.gz", ".tgz"))


def _mix(*xs: int) -> int:
    """A 63-bit seed from integers (no ``hash()`` of strings: stable across processes)."""
    s = 0x9E3779B97F4A7C15
    for x in xs:
        s = ((s ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 + 0x2545F4914F6CDD1D) & 0xFFFFFFFFFFFFFFFF
        s ^= s >> 29
    return s & 0x7FFFFFFFFFFFFFFF


def _split_node(src, rank: int, world_size: int):
    """Shards ``rank, rank + world_size, ...`` of the shard stream."""
    yield from islice(src, rank, None, world_size)


def _worker() -> tuple[int, int]:
    wi = torch.utils.data.get_worker_info()
    return (wi.id, wi.num_workers) if wi is not None else (0, 1)


def _worker_seed(rank: int) -> int:
    """Seed of this (rank, DataLoader worker) for ``webdataset.ResampledShards``."""
    return rank * 1000 + _worker()[0]


class StreamingShardDataset(torch.utils.data.IterableDataset):
    """WebDataset shards streamed with ``webdataset`` (see the module docstring).

    ``urls``: the URL spec or a list of them. ``rank``/``world_size``: this node's share (None:
    ``RANK``/``WORLD_SIZE`` from the environment or ``torch.distributed``, as ``webdataset``
    reads them; 0/1 outside a distributed run). ``resampled``: draw shards with replacement,
    endlessly. ``shard_shuffle``: a seeded shard order per epoch (finite streams).
    ``shuffle_buffer``: samples in ``webdataset``'s shuffle buffer (0: stream order).
    ``samples_per_epoch``: stop after this many samples per rank (split over the workers; the
    same count on every rank keeps distributed steps in step). ``warn_limit``: warnings per
    process before further bad samples are only counted.

    Yields sample dicts as the map-style datasets do, plus ``key`` (``"<url>:<key>"``); ``index``
    is -1 (a stream has no index).
    """

    tokenizer_kind = "subword"

    def __init__(self, urls: str | list[str], preprocess: Preprocess | None = None, *,
                 rank: int | None = None, world_size: int | None = None, resampled: bool = False,
                 shard_shuffle: bool = False, shuffle_buffer: int = 0, seed: int = 0, epoch: int = 0,
                 samples_per_epoch: int | None = None, warn_limit: int = 20) -> None:
        super().__init__()
        self.urls = expand_urls(urls)
        if not self.urls:
            raise ValueError(f"no shards in {urls!r}")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        if samples_per_epoch is not None and samples_per_epoch < 0:
            raise ValueError(f"samples_per_epoch must be >= 0, got {samples_per_epoch}")
        self.preprocess = preprocess or Preprocess()
        self.rank, self.world_size = rank, world_size
        self.resampled, self.shard_shuffle = bool(resampled), bool(shard_shuffle)
        self.shuffle_buffer, self.seed, self.epoch = int(shuffle_buffer), int(seed), int(epoch)
        self.samples_per_epoch, self.warn_limit = samples_per_epoch, int(warn_limit)
        # skip counts in shared memory, one row per DataLoader worker (the last row: no worker), so
        # that the main process sees what the workers skipped (fork or spawn) without a lock
        self._counts = torch.zeros(_COUNT_ROWS, len(SKIP_KINDS), dtype=torch.int64).share_memory_()
        self._warned = 0

    # -- counts ----------------------------------------------------------------------------------
    @property
    def skip_counts(self) -> dict[str, int]:
        """Bad input skipped so far, by kind (:data:`SKIP_KINDS`), over all workers."""
        return dict(zip(SKIP_KINDS, (int(v) for v in self._counts.sum(0).tolist())))

    @property
    def skipped(self) -> int:
        """How many bad samples (and unreadable shards) were skipped so far, over all workers."""
        return sum(self.skip_counts.values())

    def _skip(self, kind: str, msg: str) -> None:
        wi = torch.utils.data.get_worker_info()
        row = wi.id % (_COUNT_ROWS - 1) if wi is not None else _COUNT_ROWS - 1
        self._counts[row, SKIP_KINDS.index(kind)] += 1
        self._warned += 1
        if self._warned <= self.warn_limit:
            more = (f" (warning limit {self.warn_limit} reached: further bad input is counted in "
                    f"dataset.skipped, not warned)" if self._warned == self.warn_limit else "")
            warnings.warn(f"loupe.data: {msg}{more}", stacklevel=2)

    def _read_error(self, exn: Exception) -> bool:
        """``webdataset`` handler: count and warn, then go on with the next shard (or member)."""
        self._skip("read_error", f"skipping unreadable shard data: {type(exn).__name__}: "
                                 + " ".join(str(a) for a in exn.args if a is not None)[:500])
        return True

    # -- order -----------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next iteration (call it before a DataLoader starts its workers)."""
        self.epoch = int(epoch)

    def node(self) -> tuple[int, int]:
        """``(rank, world_size)`` this dataset reads for."""
        if self.world_size is not None:
            return self.rank, self.world_size
        rank, world, _, _ = _wds().utils.pytorch_worker_info()
        return rank, world

    def _pipeline(self):
        wds = _wds()
        rank, world = self.node()
        worker, workers = _worker()
        if self.resampled:
            stages = [wds.ResampledShards(self.urls, seed=_mix(self.seed, self.epoch),
                                          worker_seed=partial(_worker_seed, rank), deterministic=True)]
        else:
            if len(self.urls) < world * workers and worker == 0:
                warnings.warn(f"loupe.data: {len(self.urls)} shards for {world} rank(s) x {workers} worker(s): "
                              f"some readers get no shard (use more shards, or resampled=True)", stacklevel=3)
            order = _mix(self.seed, self.epoch, 1) if self.shard_shuffle else None
            stages = [wds.SimpleShardList(self.urls, seed=order), partial(_split_node, rank=rank, world_size=world),
                      wds.split_by_worker]
        stages.append(wds.tarfile_to_samples(handler=self._read_error))
        if self.shuffle_buffer > 0:
            import random
            rng = random.Random(_mix(self.seed, self.epoch, rank, worker, 2))
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=rng))
        stages.append(self._decode)
        pipe = wds.DataPipeline(*stages)
        if self.samples_per_epoch is None:
            return pipe
        n = self.samples_per_epoch // workers + (worker < self.samples_per_epoch % workers)
        return islice(pipe, n)

    # -- samples ---------------------------------------------------------------------------------
    def _decode(self, src):
        for g in src:
            url, key = g.get("__url__", "?"), g.get("__key__", "?")
            try:
                ext, caption, phrases = sample_fields(g)
                s = decode_sample(g[ext], f"{url}:{key}.{ext}", caption, phrases, self.preprocess)
            except SampleProblem as e:
                what = f"{url}:{key}.json: {e}" if e.kind == "bad_json" else (
                    str(e) if e.kind in ("bad_image", "bad_box") else f"{url}:{key}: {e}")
                self._skip(e.kind, f"skipping {what}")
                continue
            s["key"] = f"{url}:{key}"
            yield s

    def __iter__(self):
        return iter(self._pipeline())

    def captions(self, limit: int | None = None):
        """The captions of the shards (all of them, in order, not split by node; only the ``.txt``
        members are read), at most ``limit``: what :func:`loupe.data.fit_tokenizer` fits on."""
        wds = _wds()

        def warn(exn):
            warnings.warn(f"loupe.data: captions: skipping unreadable shard data: {exn}", stacklevel=2)
            return True

        pipe = wds.DataPipeline(wds.SimpleShardList(self.urls),
                                wds.tarfile_to_samples(handler=warn, select_files=lambda f: f.endswith(".txt")))
        caps = (c for c in (bytes(g["txt"]).decode("utf-8", "replace").strip() for g in pipe if "txt" in g) if c)
        return islice(caps, limit) if limit is not None else caps

    def __repr__(self) -> str:
        return (f"StreamingShardDataset({len(self.urls)} shards, e.g. {self.urls[0]!r}, resampled={self.resampled}, "
                f"epoch={self.epoch}, skipped={self.skipped})")


def _main() -> None:  # pragma: no cover - a quick look: python -m loupe.data.streaming URL [N]
    ds = StreamingShardDataset(sys.argv[1])
    for i, s in enumerate(islice(ds, int(sys.argv[2]) if len(sys.argv) > 2 else 5)):
        print(i, s["key"], tuple(s["image"].shape), s["caption"])
    print("skipped:", ds.skip_counts)


if __name__ == "__main__":  # pragma: no cover
    _main()
