"""Two-process gloo run of the CMC and FILIP losses (launched by test_losses.py in a subprocess).

Usage: python _dist_worker.py OUT_DIR PORT. Rank r takes its slice of a seeded global batch (ranks
hold different batch sizes and caption lengths), computes the losses (CMC, FILIP with both query
sides and with word queries only) weighted by B_r / N, and saves
the losses and the gradients of its local inputs to OUT_DIR/rank{r}.pt.
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES = (3, 2)       # samples per rank
LENGTHS = (5, 7)     # padded caption length per rank


def global_batch():
    g = torch.Generator().manual_seed(123)
    N, n, D = sum(SIZES), 6, 8
    img = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1)
    patches = torch.nn.functional.normalize(torch.randn(N, n, D, generator=g, dtype=torch.float64), dim=-1)
    Lmax = max(LENGTHS)
    words = torch.nn.functional.normalize(torch.randn(N, Lmax, D, generator=g, dtype=torch.float64), dim=-1)
    wmask = torch.zeros(N, Lmax, dtype=torch.bool)
    start = 0
    for r, (b, L) in enumerate(zip(SIZES, LENGTHS)):
        for i in range(b):
            wmask[start + i, 1:1 + (i % (L - 1)) + 1] = True
        start += b
    pmask = torch.ones(N, n, dtype=torch.bool)
    pmask[0, -2:] = False
    return img, txt, patches, pmask, words, wmask


def run(rank: int, world: int, out_dir: str, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from loupe.losses import cmc_loss, filip_loss
        img, txt, patches, pmask, words, wmask = global_batch()
        s = sum(SIZES[:rank])
        sl = slice(s, s + SIZES[rank])
        L = LENGTHS[rank]
        li = img[sl].clone().requires_grad_(True)
        lt = txt[sl].clone().requires_grad_(True)
        lp = patches[sl].clone().requires_grad_(True)
        lw = words[sl, :L].clone().requires_grad_(True)
        scale = torch.tensor(10.0, dtype=torch.float64)
        weight = SIZES[rank] / sum(SIZES)
        cmc = cmc_loss(li, lt, scale)
        fil = filip_loss(lp, pmask[sl], lw, wmask[sl, :L], scale)
        fil_words = filip_loss(lp, pmask[sl], lw, wmask[sl, :L], scale, queries="words")
        (weight * (cmc + fil + fil_words)).backward()
        torch.save({"cmc": cmc.detach(), "filip": fil.detach(), "filip_words": fil_words.detach(), "weight": weight,
                    "g_img": li.grad, "g_txt": lt.grad, "g_patch": lp.grad, "g_word": lw.grad},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    out_dir, port = sys.argv[1], int(sys.argv[2])
    mp.spawn(run, args=(2, out_dir, port), nprocs=2, join=True)
