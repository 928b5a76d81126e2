"""Issue 22: WebDataset shards streamed with the ``webdataset`` library (local paths, ``pipe:`` and
``http://`` URLs), split by node and by DataLoader worker, resampled, bad samples skipped and
counted."""
import functools
import http.server
import io
import multiprocessing
import os
import shutil
import tarfile
import threading
import warnings
from itertools import islice

import pytest
import torch

import loupe.data as ld
from loupe.data.streaming import StreamingShardDataset, expand_urls

N, PER = 40, 10  # 4 shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    synth = ld.build_dataset("synthetic", "test", seed=0, size=N)
    paths = ld.write_shards(synth, str(d), per_shard=PER)
    assert len(paths) == N // PER
    return str(d), paths


def _keys(samples):
    return [s["key"].rsplit(":", 1)[1] for s in samples]


ALL = [f"{i:08d}" for i in range(N)]


def test_pipe_cat_url_reads_what_the_map_style_reader_reads(shards):
    d, paths = shards
    url = f"pipe:cat {d}/shard-{{000000..000003}}.tar"
    assert expand_urls(url) == [f"pipe:cat {p}" for p in paths]
    ds = ld.build_dataset("webdataset", "val", path=url)  # a pipe: URL selects streaming
    assert isinstance(ds, StreamingShardDataset)
    got = list(ds)
    ref = ld.build_dataset("webdataset", path=d)  # local shards stay map-style
    assert isinstance(ref, ld.ShardDataset) and len(ref) == N
    assert _keys(got) == ALL and ds.skipped == 0
    for i, s in enumerate(got):
        r = ref[i]
        assert torch.equal(s["image"], r["image"]) and s["caption"] == r["caption"]
        assert s["phrase_spans"] == r["phrase_spans"] and torch.equal(s["boxes"], r["boxes"])
        assert torch.equal(s["shape_ids"], r["shape_ids"]) and s["index"] == -1
    # local shards stream too when asked; streaming=False refuses URLs
    loc = ld.build_dataset("webdataset", "val", path=d, streaming=True)
    assert isinstance(loc, StreamingShardDataset) and _keys(loc) == ALL
    with pytest.raises(ValueError, match="local shards only"):
        ld.build_dataset("webdataset", path=url, streaming=False)
    assert sum(1 for _ in ds.captions()) == N
    tok = ld.fit_tokenizer(ds, vocab_size=300, min_frequency=1)
    batch = ld.Collator(tok)(got[:8])
    assert batch["images"].shape[0] == 8


def _rank_keys(url, rank, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2")  # what a distributed launcher sets
    ds = StreamingShardDataset(url)
    queue.put((rank, ds.node(), _keys(ds)))


def test_node_split_on_two_processes(shards):
    d, _ = shards
    url = f"pipe:cat {d}/shard-{{000000..000003}}.tar"
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_rank_keys, args=(url, r, q)) for r in range(2)]
    for p in procs:
        p.start()
    out = {r: (node, keys) for r, node, keys in (q.get(timeout=60) for _ in procs)}
    for p in procs:
        p.join(30)
    assert out[0][0] == (0, 2) and out[1][0] == (1, 2)
    k0, k1 = out[0][1], out[1][1]
    assert len(k0) == len(k1) == N // 2 and not set(k0) & set(k1)
    assert sorted(k0 + k1) == ALL  # every sample exactly once over the two ranks
    # the same split from explicit arguments, and it holds with a shuffled shard order
    for shuffle in (False, True):
        parts = [_keys(StreamingShardDataset(url, rank=r, world_size=2, shard_shuffle=shuffle, seed=3))
                 for r in range(2)]
        assert sorted(parts[0] + parts[1]) == ALL and not set(parts[0]) & set(parts[1])
    assert parts == [_keys(StreamingShardDataset(url, rank=r, world_size=2, shard_shuffle=True, seed=3))
                     for r in range(2)]  # seeded: the same order again


def test_worker_split_with_two_dataloader_workers(shards):
    d, _ = shards
    for rank in (0, 1):
        ds = StreamingShardDataset(d, rank=rank, world_size=2)
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
        keys = _keys(dl)
        assert len(keys) == N // 2 and len(set(keys)) == N // 2
    ds = StreamingShardDataset(d, shuffle_buffer=16, seed=1)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    keys = _keys(dl)
    assert sorted(keys) == ALL and keys != ALL  # each sample once, shuffled within the workers
    assert _keys(dl) == keys  # seeded by (seed, epoch, rank, worker)


def _bad_shard(src, dst):
    """``src`` with sample 1's sidecar invalid (a span past the caption) and sample 2's caption
    missing."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as tout:
        for m in tin:
            data = tin.extractfile(m).read()
            if m.name == "00000001.json":
                data = b'{"phrases": [{"span": [0, 9999]}]}'
            if m.name == "00000002.txt":
                continue
            ti = tarfile.TarInfo(m.name)
            ti.size = len(data)
            tout.addfile(ti, io.BytesIO(data))


def test_bad_samples_and_shards_are_skipped_and_counted(shards, tmp_path):
    _, paths = shards
    bad = str(tmp_path / "bad-000000.tar")
    _bad_shard(paths[0], bad)
    with pytest.warns(UserWarning) as rec:
        ref = ld.ShardDataset(bad)  # the map-style reader skips the same samples, by the same checks
    assert "invalid .json sidecar" in " ".join(str(w.message) for w in rec)
    assert len(ref) == PER - 2 and ref.skipped == 2
    url = f"pipe:cat {bad}::pipe:cat {tmp_path}/missing.tar"
    with pytest.warns(UserWarning) as rec:
        ds = StreamingShardDataset(url)
        got = _keys(ds)
    assert got == [ref.items[i]["name"].rsplit(":", 1)[1][:8] for i in range(len(ref))]
    assert ds.skip_counts == {**dict.fromkeys(ld.formats.SKIP_KINDS, 0),
                              "bad_json": 1, "no_caption": 1, "read_error": 1}
    msgs = " | ".join(str(w.message) for w in rec)
    assert "00000001.json: phrase 0: span [0, 9999] outside the caption" in msgs
    assert "missing.tar" in msgs
    # in DataLoader workers: the counts come back to the main process
    ds2 = StreamingShardDataset([bad, paths[1]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n = len(list(torch.utils.data.DataLoader(ds2, batch_size=None, num_workers=2)))
    assert n == 2 * PER - 2 and ds2.skipped == 2
    # a shard cut short: the complete samples before the cut are kept, the break is counted
    cut = f"pipe:head -c {os.path.getsize(paths[0]) // 2} {paths[0]}"
    with pytest.warns(UserWarning, match="skipping"):
        ds3 = StreamingShardDataset(cut)
        n = len(list(ds3))
    assert 0 < n < PER and ds3.skipped >= 1


def test_resampled_stream_is_endless_and_seeded(shards):
    d, _ = shards
    ds = StreamingShardDataset(f"{d}/shard-{{000000..000003}}.tar", resampled=True, seed=5)
    first = _keys(islice(ds, 3 * N))
    assert len(first) == 3 * N > N and set(first) <= set(ALL)  # more than one pass
    assert _keys(islice(ds, 3 * N)) == first  # deterministic in (seed, epoch, rank, worker)
    ds.set_epoch(1)
    assert _keys(islice(ds, 3 * N)) != first
    capped = ld.build_dataset("webdataset", "train", path=d, streaming=True, resampled=True,
                              samples_per_epoch=2 * N + 3)
    dl = torch.utils.data.DataLoader(capped, batch_size=None, num_workers=2)
    assert len(list(dl)) == 2 * N + 3  # split over the workers, the total per rank exact


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.mark.skipif(shutil.which("curl") is None, reason="webdataset reads http:// with curl")
def test_http_urls(shards):
    d, _ = shards
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=d))
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/shard-{{000001..000002}}.tar"
        ds = ld.build_dataset("webdataset", "val", path=url)
        assert isinstance(ds, StreamingShardDataset)
        assert _keys(ds) == ALL[PER:3 * PER] and ds.skipped == 0
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow  # ~5 s: a spawned worker imports torch
def test_counts_come_back_from_a_spawned_worker(shards, tmp_path):
    _, paths = shards
    ds = StreamingShardDataset([paths[0], str(tmp_path / "missing.tar")], warn_limit=0)
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=1, multiprocessing_context="spawn")
    assert len(list(dl)) == PER and ds.skip_counts["read_error"] == 1
