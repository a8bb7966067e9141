"""Any timm model as a patch encoder, by name: `timm:hf-hub:<repo>` (UNI, Virchow, H-optimus, ... as
their model cards give them to timm) or `timm:<timm model name>`. The model's own pretrained config
gives its preprocessing; its classifier is removed (num_classes=0), the pooled embedding is the feature."""
from __future__ import annotations

import math

from benchmark.registry import ENCODERS
from methods.encoders.base import PatchEncoder, Preprocess
from methods.encoders.weights import (
    WeightsSpec,
    hub_errors,
    load_strict,
    no_init,
    parse_weights,
    read_state_dict,
    seeded_init,
)

PREFIX = "timm:"


def hub_repo(model_name: str) -> str:
    return model_name[len("hf-hub:") :] if model_name.startswith("hf-hub:") else model_name


def create_timm_model(model_name: str, spec: WeightsSpec):
    """hf-hub names need the hub (or its cache) even for random weights: their architecture is in
    the repo's config.json."""
    import timm

    repo = hub_repo(model_name)
    with hub_errors(repo, "model.safetensors"):
        if spec.kind == "hub":
            return timm.create_model(model_name, pretrained=True, num_classes=0)
        with no_init() if spec.kind == "path" else seeded_init():
            model = timm.create_model(model_name, pretrained=False, num_classes=0)
    if spec.kind == "path":
        classifier = model.pretrained_cfg.get("classifier") or "head"
        state = {k: v for k, v in read_state_dict(spec.path).items() if not k.startswith(classifier + ".")}
        load_strict(model, state, f"{model_name} (from {spec.path})")
    return model


def timm_preprocess(model, input_size: int | None) -> Preprocess:
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    size = input_size or cfg["input_size"][-1]
    crop_pct = cfg.get("crop_pct") or 1.0
    return Preprocess(
        input_size=size,
        resize_size=math.floor(size / crop_pct),
        interpolation="bicubic" if cfg.get("interpolation") == "bicubic" else "bilinear",
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
    )


def timm_encoder(name: str, weights: str | None = "hub", input_size: int | None = None) -> PatchEncoder:
    if not name.startswith(PREFIX) or len(name) == len(PREFIX):
        raise ValueError(f"timm encoders are named timm:<model>, e.g. timm:hf-hub:MahmoodLab/UNI; got '{name}'")
    model_name = name[len(PREFIX) :]
    spec = parse_weights(weights)
    model = create_timm_model(model_name, spec)
    return PatchEncoder(name, model, model.num_features, timm_preprocess(model, input_size), spec.provenance(hub_repo(model_name)))


ENCODERS.add("timm", timm_encoder, "any timm model by name: timm:hf-hub:<repo> (e.g. timm:hf-hub:MahmoodLab/UNI) or timm:<model>")
