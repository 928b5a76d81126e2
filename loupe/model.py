"""The LOUPE dual encoder (METHOD sections 1, 4, 9): :class:`LoupeModel` only.

- The towers (``loupe.transformer``): a ViT and a text transformer (or frozen MiniLM). Word
  tokens = valid tokens that are neither the pooled token nor a special token.
- Candidate regions (``loupe.regions``): box features of every whole-patch box from a summed-area
  table, an objectness head, top-M regions after NMS.
- ``forward(batch)`` computes everything the configured objective needs, losses included, so that
  ZeRO-3 sees every parameter use inside ``forward``.

Inference: ``encode_image``, ``encode_text``, ``phrase_features`` (and the token-level
``encode_image_tokens`` / ``encode_text_tokens`` / ``box_features`` used by evaluation).
The objectives call ``box_features_at`` and ``objectness``. Saving and loading: ``loupe.checkpoint``;
grounding a caption in an image: ``loupe.ground``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import losses as _losses
from . import regions as _regions
from .config import LoupeConfig
from .transformer import FrozenMiniLM, TextTransformer, VisionTransformer, center_words

__all__ = ["LoupeModel", "LONE_PHRASE_PARTNERS", "batch_attention"]


#: partner phrases that give a phrase without a caption the multi-phrase context of training
#: (:meth:`LoupeModel.encode_lone_phrases`; chosen on the validation split) [ours]
LONE_PHRASE_PARTNERS: tuple[str, ...] = ("a white thing", "a black thing", "a small thing", "a large thing")



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
        self.loss_ramp = {k: v for k, v in (config.loss_ramp or {}).items() if k in self.loss_weights}
        # a ramp of a term the objective has but weighs 0 (an ablation) is moot; one of a term the
        # objective does not have is a mistake
        own = {n for n, t in _losses.LOSS_TERMS.items() if config.objective in t.objectives} | set(self.loss_weights)
        unknown = sorted(set(config.loss_ramp or {}) - own)
        if unknown:
            raise ValueError(f"LoupeConfig.loss_ramp names {unknown}, which objective {config.objective!r} does not "
                             f"train; its terms: {sorted(self.loss_weights)}")
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
        self.register_buffer("candidate_boxes", boxes, persistent=False)  # [K, 4] patch units
        self.register_buffer("box_geometry", _regions.box_geometry(boxes, g, g), persistent=False)
        self.register_buffer("nms_suppress", _regions.suppression_matrix(boxes, config.nms_iou),
                             persistent=False)  # [K, K]
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

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised global image embeddings ``[B, D]``."""
        return self.encode_image_tokens(images)[0]

    @torch.no_grad()
    def coalition_scores(self, images: torch.Tensor, image_index: torch.Tensor, keep: torch.Tensor,
                         text_emb: torch.Tensor, *, compact: bool = True, chunk: int = 64) -> torch.Tensor:
        """Image-text score of many coalitions of patches: ``[N]``, no gradient.

        Row ``j``: the cosine of the embedding of image ``image_index[j]`` encoded with only the patches
        ``keep[j]`` (the others masked out of every layer's attention, see
        :meth:`loupe.transformer.VisionTransformer.forward`; the model's own pooling) with
        ``text_emb[j]``. ``images [B, C, H, W]``, ``image_index [N]`` long, ``keep [N, n]`` bool,
        ``text_emb [N, D]``. The value of a coalition without patches is 0 (``v(empty) = 0``, METHOD
        5) and such rows are not encoded. ``compact`` drops the masked tokens from the sequences
        (the same result, less work); rows are sorted by coalition size and encoded ``chunk`` at a
        time, so rows of similar length share a pass. Returns the dtype of ``text_emb`` (float32 at
        least).
        """
        n = self.grid_size ** 2
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.dim() != 2 or keep.shape[1] != n:
            raise ValueError(f"coalition_scores: keep must be a bool tensor [N, {n}], got "
                             f"{getattr(keep, 'dtype', type(keep).__name__)} {list(getattr(keep, 'shape', []))}")
        N = keep.shape[0]
        if not isinstance(image_index, torch.Tensor) or image_index.shape != (N,) or image_index.is_floating_point():
            raise ValueError(f"coalition_scores: image_index must be an integer tensor [N={N}], got "
                             f"{list(getattr(image_index, 'shape', []))}")
        if not isinstance(text_emb, torch.Tensor) or text_emb.dim() != 2 or text_emb.shape[0] != N:
            raise ValueError(f"coalition_scores: text_emb must be [N={N}, D], got {list(getattr(text_emb, 'shape', []))}")
        if int(chunk) < 1:
            raise ValueError(f"coalition_scores: chunk must be >= 1, got {chunk!r}")
        images = self._check_images(images)
        if N and (int(image_index.min()) < 0 or int(image_index.max()) >= images.shape[0]):
            raise ValueError(f"coalition_scores: image_index must lie in [0, {images.shape[0]})")
        out_dtype = torch.promote_types(text_emb.dtype, torch.float32)
        scores = torch.zeros(N, dtype=out_dtype, device=text_emb.device)
        cnt = keep.sum(1)
        rows = (cnt > 0).nonzero(as_tuple=True)[0]
        rows = rows[cnt[rows].argsort(stable=True)]  # by size: rows of one pass have similar lengths
        for c0 in range(0, rows.numel(), int(chunk)):
            r = rows[c0:c0 + int(chunk)]
            used, local = image_index[r].unique(return_inverse=True)
            emb, _ = self.visual(images[used], keep=keep[r], image_index=local, compact=compact)
            scores[r] = (emb.to(out_dtype) * F.normalize(text_emb[r].to(out_dtype), dim=-1)).sum(-1)
        return scores

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
        ``box_feats``/``box_feats_out [B, K, D]`` are returned with ``dense_features=True``.

        The objectness of all K boxes runs through :meth:`RegionGenerator.dense` (the head's
        first layer on the patch tokens, then box sums: no ``[B, K, 2D+7]`` input; the cpu kernel of
        :func:`loupe_kernels.box_objectness`). The dense outputs carry no gradient (ranking, NMS,
        candidate choice; no loss term needs one); the region outputs are recomputed for the M boxes
        with gradient: the same values up to float rounding, a backward over M boxes instead of K.
        """
        g = self.grid_size
        res: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            backend = self.config.kernel_backend if self.config.kernel_backend in ("cpu", "reference") else None
            logits, inv_in, inv_out = self.region_head.dense(patch_tokens, g, g, self.box_geometry, backend=backend)
            if dense_features:
                res["box_feats"], res["box_feats_out"], _ = self.box_features(patch_tokens)
        idx, valid = _regions.nms_topk(logits, self.nms_suppress, self.config.num_regions)
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
        # the ramp follows the training step, in training mode only: evaluation and the in-training
        # validation losses (eval mode, batches that carry a step) use the full weights
        step = batch.get("step") if self.training else None
        for name, weight in self.loss_weights.items():
            if step is not None and self.loss_ramp.get(name, 0) > 0:
                weight = weight * min(1.0, int(step) / self.loss_ramp[name])
            term = _losses.LOSS_TERMS.get(name)
            if term is None:
                raise RuntimeError(f"loss term {name!r} was unregistered after the model was built")
            module = self.loss_modules[name] if name in self.loss_modules else None
            value = term.fn(out, batch, self, module)
            out[f"loss_{name}"] = value
            total = weight * value if total is None else total + weight * value
        out["loss"] = total
        return out
