"""CONCH v1's vision tower (MahmoodLab, CoCa): the 512-d patch embedding MIL pipelines use.

Our own module, built to the released architecture (shared BASELINES.md section 2): timm ViT-B/16 at
448 px -> attentional pooler (1 query of width 512 attending over all 1 + 28 x 28 trunk tokens) ->
LayerNorm(512). The MIL embedding is that vector, before `proj_contrast` and without L2 norm (what
CLAM and TRIDENT extract). The official loader loads non-strictly, which hides a wrong checkpoint;
here the vision keys we use load strictly and everything else in the CoCa checkpoint must be a part
we knowingly leave out.
"""
from __future__ import annotations

import torch
from torch import nn

from benchmark.registry import ENCODERS
from methods.encoders.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PatchEncoder, Preprocess
from methods.encoders.weights import (
    WeightsSpec,
    WeightsUnavailableError,
    hub_file,
    load_strict,
    no_init,
    parse_weights,
    read_state_dict,
    seeded_init,
)

HUB_REPO = "MahmoodLab/conch"
CHECKPOINT = "pytorch_model.bin"
IMG_SIZE = 448
VISION_PREFIX = "visual."
# CoCa parts outside the MIL embedding: the text tower and decoder, the captioning pooler, the
# contrastive projection (applied after the embedding we keep) and the temperature.
UNUSED_PREFIXES = (
    "text.",
    "text_decoder.",
    "logit_scale",
    "visual.attn_pool_caption.",
    "visual.ln_caption.",
    "visual.proj_contrast",
)


class AttentionalPooler(nn.Module):
    """n learned queries attending over the LayerNorm'ed trunk tokens (CoCa's pooler; parameter names
    as in the released checkpoint: query, attn.*, ln_q, ln_k)."""

    def __init__(self, d_model: int = 512, context_dim: int = 768, n_head: int = 8, n_queries: int = 1):
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, kdim=context_dim, vdim=context_dim, batch_first=True)
        self.ln_q = nn.LayerNorm(d_model)
        self.ln_k = nn.LayerNorm(context_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        keys = self.ln_k(tokens)
        queries = self.ln_q(self.query).unsqueeze(0).expand(tokens.shape[0], -1, -1)
        return self.attn(queries, keys, keys, need_weights=False)[0]


class ConchVision(nn.Module):
    """trunk (timm ViT-B/16, dynamic image size) + attn_pool_contrast + ln_contrast -> (B, 512)."""

    def __init__(self):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.trunk = VisionTransformer(
            img_size=IMG_SIZE, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4,
            num_classes=0, dynamic_img_size=True,
        )
        self.attn_pool_contrast = AttentionalPooler(d_model=512, context_dim=768, n_head=8, n_queries=1)
        self.ln_contrast = nn.LayerNorm(512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk.forward_features(x)  # (B, 1 + grid tokens, 768), after the final norm
        return self.ln_contrast(self.attn_pool_contrast(tokens)[:, 0])


def vision_state_dict(checkpoint: dict[str, torch.Tensor], model: ConchVision) -> dict[str, torch.Tensor]:
    """The checkpoint's vision keys we use, renamed to the module's, pos_embed resampled to the
    module's grid. Keys outside both the used set and the known unused CoCa parts are unexpected."""
    from timm.layers import resample_abs_pos_embed

    state, unexpected = {}, []
    for key, value in checkpoint.items():
        if key.startswith(UNUSED_PREFIXES):
            continue
        if key.startswith(VISION_PREFIX):
            state[key[len(VISION_PREFIX) :]] = value
        else:
            unexpected.append(key)
    if unexpected:
        raise WeightsUnavailableError(
            f"checkpoint does not fit conch_v1 (unexpected {len(unexpected)}: {', '.join(sorted(unexpected)[:8])}); "
            f"pass CONCH's {CHECKPOINT} from huggingface.co/{HUB_REPO}"
        )
    pos_embed = state.get("trunk.pos_embed")
    if pos_embed is not None and pos_embed.shape != model.trunk.pos_embed.shape:
        # as the official loader does: bilinear, no antialias, class token kept
        state["trunk.pos_embed"] = resample_abs_pos_embed(
            pos_embed.float(), new_size=model.trunk.patch_embed.grid_size,
            num_prefix_tokens=model.trunk.num_prefix_tokens, interpolation="bilinear", antialias=False,
        )
    return state


def load_conch_checkpoint(model: ConchVision, path) -> None:
    load_strict(model, vision_state_dict(read_state_dict(path), model), f"conch_v1 (from {path})")


def build_conch(spec: WeightsSpec) -> ConchVision:
    # the checkpoint first: an unavailable one fails before the model is built
    path = hub_file(HUB_REPO, CHECKPOINT, gated=True) if spec.kind == "hub" else spec.path  # None: random
    with no_init() if path is not None else seeded_init():
        model = ConchVision()
    if path is not None:
        load_conch_checkpoint(model, path)
    return model


@ENCODERS.register("conch_v1", "CONCH v1 vision tower (ViT-B/16 + attentional pooler), 512-d before projection; gated HF repo MahmoodLab/conch",
                   hub_repo=HUB_REPO)
def conch_v1(weights: str | None = "hub", input_size: int | None = None) -> PatchEncoder:
    """input_size: 448 (CONCH's, TRIDENT's); CLAM feeds 224 and relies on the dynamic image size."""
    spec = parse_weights(weights)
    size = input_size or IMG_SIZE
    if size % 16:
        raise ValueError(f"conch_v1 input size must be a multiple of its 16-px patches, got {size}")
    preprocess = Preprocess(input_size=size, resize_size=size, interpolation="bicubic", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    return PatchEncoder("conch_v1", build_conch(spec), 512, preprocess, spec.provenance(HUB_REPO))
