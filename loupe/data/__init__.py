"""loupe.data: grounded image-caption data for LOUPE.

Built-in sets (generated on the fly, deterministic in ``(seed, split, index)``):

- ``synthetic``: 64x64 scenes of 1-3 coloured shapes with phrases, character spans and exact boxes;
- ``fashion`` / ``emoji``: the same scenes with Fashion-MNIST photos or colour-emoji objects
  (Debian ``dataset-fashion-mnist``; ``fonts-noto-color-emoji`` + PyPI ``emoji``).

Splits: ``train``, ``val``, ``test`` (disjoint sample streams), ``compositional`` (only the
colour-noun pairs held out of the other splits), ``single`` (one object per image, for
classification). User data: ``csv`` (open_clip-style CSV/TSV) and ``webdataset`` (tar shards: local
and map-style, or streamed from URLs and ``pipe:`` commands with the ``webdataset`` library).

Typical use (what the trainer does)::

    ds = build_dataset("synthetic", "train", seed=0, size=50000)
    tok = fit_tokenizer(ds); tok.save("tokenizer.json"); tok = load_tokenizer("tokenizer.json")
    loader = DataLoader(ds, batch_size=64, collate_fn=Collator(tok))

A sample (``ds[i]``) is a dict: ``image [3, S, S]`` uint8, ``caption`` str, ``phrase_spans``
list of character ``(start, end)``, ``boxes [K, 4]`` float xyxy pixels (NaN when unknown),
``shape_ids``/``color_ids [K]`` long (-1 when unknown), ``index`` int; or None for bad input.
"""
from __future__ import annotations

import random

import numpy as np
import torch

from ..config import DATASET_TYPES
from .formats import CsvDataset, ShardDataset, write_csv, write_shards
from .pipeline import CLIP_MEAN, CLIP_STD, Collator, Preprocess, open_image
from .scenes import (COLOR_NAMES, CONTROLLED, DEFAULT_SIZES, HELD_OUT_SPLITS, SHAPES, SPLITS, Catalog, Scene,
                     SceneGenerator,
                     ShapeCatalog, oracle_iou)
from .streaming import StreamingShardDataset, expand_urls, is_url
from .text import (SubwordTokenizer, WordTokenizer, chunk_noun_phrases, load_tokenizer,
                   train_tokenizer)

__all__ = ["build_dataset", "fit_tokenizer", "load_tokenizer", "Collator", "Preprocess", "SceneDataset",
           "CsvDataset", "ShardDataset", "StreamingShardDataset", "expand_urls", "RankShard", "write_shards",
           "write_csv", "chunk_noun_phrases",
           "WordTokenizer", "SubwordTokenizer", "train_tokenizer", "oracle_iou", "oracle_grounding",
           "SceneGenerator", "ShapeCatalog", "Scene", "SHAPES", "COLOR_NAMES", "SPLITS", "CONTROLLED",
           "DATASET_TYPES", "CLIP_MEAN", "CLIP_STD", "open_image"]



class SceneDataset(torch.utils.data.Dataset):
    """Map-style dataset of generated grounded scenes (``len = size``)."""

    tokenizer_kind = "word"

    def __init__(self, catalog: Catalog, split: str = "train", size: int | None = None, seed: int = 0,
                 image_size: int = 64, max_objects: int = 3, hard_mix: float = 0.0,
                 sample_seed: int | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
        if split in HELD_OUT_SPLITS and not catalog.colored:
            raise ValueError(f"{catalog.name} objects have no colours, so no {split} split")
        if not 0.0 <= float(hard_mix) <= 1.0:
            raise ValueError(f"hard_mix must be in [0, 1], got {hard_mix!r}")
        if hard_mix and split != "train":
            raise ValueError(f"hard_mix mixes controlled scenes into the train split only, not {split!r}")
        self.generator = SceneGenerator(catalog, seed=seed, image_size=image_size, max_objects=max_objects,
                                        sample_seed=sample_seed)
        self.split, self.size = split, int(DEFAULT_SIZES[split] if size is None else size)
        self.hard_mix = float(hard_mix)
        self.skipped = 0
        self.class_names: tuple[str, ...] = catalog.nouns
        self.color_names: tuple[str, ...] = COLOR_NAMES if catalog.colored else ()

    def __len__(self) -> int:
        return self.size

    def scene(self, i: int, render: bool = True) -> Scene:
        """The raw :class:`Scene` ``i`` (image ``[3, S, S]`` uint8 numpy). With ``hard_mix`` a share of
        the training scenes comes from the controlled streams (``train_hard`` and ``train_relation``,
        half each), chosen by a pure function of (seed, i)."""
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for {self.size} scenes")
        split = self.split
        if self.hard_mix > 0:
            u = random.Random((self.generator.sample_seed << 32) ^ (i * 2654435761) ^ 0x5EED).random()
            if u < self.hard_mix:
                split = "train_hard" if u < self.hard_mix / 2 else "train_relation"
        return self.generator.scene(split, i, render=render)

    def __getitem__(self, i: int) -> dict:
        sc = self.scene(int(i))
        long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
        return {"image": torch.from_numpy(sc.image), "caption": sc.caption, "phrase_spans": sc.spans,
                "boxes": torch.from_numpy(sc.boxes), "shape_ids": long(sc.shape_ids),
                "color_ids": long(sc.color_ids), "index": int(i),
                # every object of the scene, the named ones first (the distractors after them)
                "all_boxes": torch.from_numpy(np.concatenate([sc.boxes, sc.other_boxes]).reshape(-1, 4)),
                "all_shape_ids": long(sc.shape_ids + sc.other_shape_ids),
                "all_color_ids": long(sc.color_ids + sc.other_color_ids),
                "all_size_ids": long(sc.size_ids + sc.other_size_ids)}

    def captions(self):
        """Captions of every scene, without drawing (with ``hard_mix``, the mixed scenes' captions)."""
        if self.hard_mix > 0:
            return (self.scene(i, render=False).caption for i in range(self.size))
        return self.generator.captions(self.split, self.size)


class RankShard(torch.utils.data.Dataset):
    """Items ``rank, rank + world_size, ...`` of ``dataset``: ranks never overlap and together
    cover it (the last ranks get one item fewer when ``len`` is not a multiple)."""

    def __init__(self, dataset, rank: int, world_size: int) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.dataset, self.rank, self.world_size = dataset, rank, world_size
        self.tokenizer_kind = getattr(dataset, "tokenizer_kind", "word")
        self.skipped = getattr(dataset, "skipped", 0)

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.world_size))

    def __getitem__(self, i: int):
        return self.dataset[self.rank + int(i) * self.world_size]

    def captions(self):
        caps = self.dataset.captions()
        for j, c in enumerate(caps):
            if j % self.world_size == self.rank:
                yield c


def _catalog(dataset_type: str) -> Catalog:
    if dataset_type == "synthetic":
        return ShapeCatalog()
    from . import real
    if dataset_type == "fashion":
        return real.FashionCatalog()
    if dataset_type == "emoji":
        return real.EmojiCatalog()
    raise ValueError(f"unknown dataset type {dataset_type!r}; expected one of {DATASET_TYPES}")


def build_dataset(dataset_type: str, split: str = "train", *, seed: int = 0, size: int | None = None,
                  path: str | list[str] | None = None, image_size: int = 64, max_objects: int = 3,
                  hard_mix: float = 0.0, sample_seed: int | None = None,
                  img_key: str = "filepath", caption_key: str = "title", separator: str = "\t",
                  crop: str = "center", rank: int | None = None, world_size: int | None = None,
                  streaming: bool | None = None, resampled: bool = False, shard_shuffle: bool | None = None,
                  shuffle_buffer: int | None = None, samples_per_epoch: int | None = None, **_ignored):
    """A map-style dataset of samples (see the module docstring), or for streamed shards an
    iterable one.

    ``dataset_type``: ``synthetic``, ``fashion``, ``emoji`` (built-in; ``split`` in
    ``train|val|test|compositional|single``, ``size`` scenes, default 50000 for train and 1000
    otherwise, all fixed by ``seed``) or ``csv`` / ``webdataset`` (``path``: the CSV/TSV file or the
    shards, a directory, glob or ``{000..009}`` range; ``split`` is then only a label).
    ``world_size > 1`` keeps this ``rank``'s disjoint share (:class:`RankShard`).
    Missing Fashion-MNIST / emoji files raise ``FileNotFoundError`` naming the package to install.

    ``webdataset`` with ``streaming=True``, or with a ``path`` holding a URL or ``pipe:`` command
    (``streaming=None``, the default, decides so; ``streaming=False`` refuses URLs), gives a
    :class:`StreamingShardDataset` (``webdataset`` library; see :mod:`loupe.data.streaming`):
    shards split by node (``rank``/``world_size``; None: from ``RANK``/``WORLD_SIZE`` or
    ``torch.distributed``) and DataLoader worker, ``resampled`` for an endless stream drawn with
    replacement, ``shard_shuffle`` and ``shuffle_buffer`` (None: on, 1000 samples, for the
    ``train`` split; off otherwise), ``samples_per_epoch`` per rank, all seeded by ``seed``. It
    has no ``len`` and no random access: the trainer's exact resume needs the map-style reader.
    """
    if dataset_type in ("csv", "webdataset"):
        if not path:
            raise ValueError(f"dataset type {dataset_type!r} needs path=")
        pre = Preprocess(image_size, crop)
        urls = [path] if isinstance(path, str) else list(path)
        has_url = any(is_url(str(u)) for u in urls)
        if dataset_type == "csv" and streaming:
            raise ValueError("streaming=True reads webdataset shards, not csv")
        if dataset_type == "webdataset" and streaming is False and has_url:
            raise ValueError(f"streaming=False reads local shards only, not {path!r}")
        if dataset_type == "webdataset" and (streaming or (streaming is None and has_url)):
            train = split == "train"
            return StreamingShardDataset(
                path, pre, rank=(rank or 0) if world_size is not None else None, world_size=world_size,
                resampled=resampled, shard_shuffle=train if shard_shuffle is None else shard_shuffle,
                shuffle_buffer=(1000 if train else 0) if shuffle_buffer is None else shuffle_buffer,
                seed=seed, samples_per_epoch=samples_per_epoch)
        ds = (CsvDataset(path, img_key, caption_key, separator, pre) if dataset_type == "csv"
              else ShardDataset(path, pre))
    else:
        ds = SceneDataset(_catalog(dataset_type), split, size, seed, image_size, max_objects, hard_mix, sample_seed)
    if world_size is not None and world_size > 1:
        ds = RankShard(ds, 0 if rank is None else rank, world_size)
    return ds


def fit_tokenizer(dataset, kind: str | None = None, **kwargs) -> WordTokenizer | SubwordTokenizer:
    """Fit the dataset's tokenizer on its captions: word-level for the built-in sets, WordPiece
    (``tokenizers`` library) for csv/webdataset; ``kind`` overrides (``word`` or ``subword``)."""
    kind = kind or getattr(dataset, "tokenizer_kind", "word")
    return train_tokenizer(dataset.captions(), kind, **kwargs)


def oracle_grounding(dataset, n: int | None = None, patch: int = 8, threshold: float = 0.5) -> dict:
    """Whole-patch oracle on the first ``n`` scenes: for every phrase, the best IoU any box made of
    whole ``patch``-pixel patches reaches with its true box. Returns ``accuracy`` (share with IoU
    >= ``threshold``), ``min_iou``, ``mean_iou`` and ``phrases``."""
    n = len(dataset) if n is None else min(n, len(dataset))
    ious = []
    for i in range(n):
        if isinstance(dataset, SceneDataset):
            sc = dataset.scene(i, render=False)
            boxes, S = sc.boxes, dataset.generator.image_size
        else:
            s = dataset[i]
            if s is None:
                continue
            boxes, S = s["boxes"].numpy(), s["image"].shape[-1]
        for b in boxes:
            if np.isfinite(b).all():
                ious.append(oracle_iou(tuple(float(v) for v in b), S, patch)[0])
    a = np.array(ious)
    if a.size == 0:
        raise ValueError("oracle_grounding: no boxes")
    return {"accuracy": float((a >= threshold).mean()), "min_iou": float(a.min()),
            "mean_iou": float(a.mean()), "phrases": int(a.size)}
