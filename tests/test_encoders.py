"""Patch encoders: checkpoint layouts, strict loading, preprocessing, and the weights messages."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from methods.encoders import create_encoder, weights_provenance
from methods.encoders.base import IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from methods.encoders.conch import AttentionalPooler, ConchVision, vision_state_dict
from methods.encoders.weights import WeightsUnavailableError, load_strict, parse_weights, read_state_dict


def official_conch_checkpoint(grid: int = 28) -> dict[str, torch.Tensor]:
    """Random tensors under the key names and shapes of MahmoodLab/conch's pytorch_model.bin (vision
    tower), written out here rather than taken from our module, plus parts of the CoCa model we skip."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    sd = {"visual.trunk.cls_token": r(1, 1, 768), "visual.trunk.pos_embed": r(1, 1 + grid * grid, 768),
          "visual.trunk.patch_embed.proj.weight": r(768, 3, 16, 16), "visual.trunk.patch_embed.proj.bias": r(768)}
    for i in range(12):
        b = f"visual.trunk.blocks.{i}."
        sd.update({b + "norm1.weight": 1 + r(768), b + "norm1.bias": r(768),
                   b + "attn.qkv.weight": r(2304, 768), b + "attn.qkv.bias": r(2304),
                   b + "attn.proj.weight": r(768, 768), b + "attn.proj.bias": r(768),
                   b + "norm2.weight": 1 + r(768), b + "norm2.bias": r(768),
                   b + "mlp.fc1.weight": r(3072, 768), b + "mlp.fc1.bias": r(3072),
                   b + "mlp.fc2.weight": r(768, 3072), b + "mlp.fc2.bias": r(768)})
    sd.update({"visual.trunk.norm.weight": 1 + r(768), "visual.trunk.norm.bias": r(768)})
    p = "visual.attn_pool_contrast."
    sd.update({p + "query": r(1, 512), p + "attn.q_proj_weight": r(512, 512), p + "attn.k_proj_weight": r(512, 768),
               p + "attn.v_proj_weight": r(512, 768), p + "attn.in_proj_bias": r(1536),
               p + "attn.out_proj.weight": r(512, 512), p + "attn.out_proj.bias": r(512),
               p + "ln_q.weight": 1 + r(512), p + "ln_q.bias": r(512), p + "ln_k.weight": 1 + r(768), p + "ln_k.bias": r(768)})
    sd.update({"visual.ln_contrast.weight": 1 + r(512), "visual.ln_contrast.bias": r(512), "visual.proj_contrast": r(512, 512)})
    # parts of the CoCa checkpoint outside the MIL embedding (shapes abridged: they are never loaded)
    sd.update({"visual.attn_pool_caption.query": r(256, 768), "visual.attn_pool_caption.attn.in_proj_weight": r(8, 8),
               "visual.ln_caption.weight": r(768), "text.token_embedding.weight": r(16, 8),
               "text.transformer.resblocks.0.attn.in_proj_weight": r(8, 8), "text_decoder.resblocks.0.ln_1.weight": r(8),
               "logit_scale": torch.tensor(4.6)})
    return sd


@pytest.fixture(scope="module")
def checkpoint():
    return official_conch_checkpoint()


@pytest.fixture(scope="module")
def checkpoint_file(checkpoint, tmp_path_factory):
    path = tmp_path_factory.mktemp("conch") / "pytorch_model.bin"
    torch.save({f"module.{k}": v for k, v in checkpoint.items()}, path)  # as a DDP-wrapped model saves it
    return path


def test_official_layout_loads_strictly_with_module_prefix(checkpoint, checkpoint_file):
    encoder = create_encoder("conch_v1", weights=str(checkpoint_file), input_size=224)
    state = encoder.net.state_dict()
    for ours, theirs in [("trunk.blocks.11.mlp.fc2.weight", "visual.trunk.blocks.11.mlp.fc2.weight"),
                         ("attn_pool_contrast.attn.k_proj_weight", "visual.attn_pool_contrast.attn.k_proj_weight"),
                         ("attn_pool_contrast.query", "visual.attn_pool_contrast.query"),
                         ("ln_contrast.bias", "visual.ln_contrast.bias")]:
        torch.testing.assert_close(state[ours], checkpoint[theirs])
    assert encoder.embed_dim == 512 and encoder.weights == f"pretrained:file:{checkpoint_file}"
    with torch.no_grad():
        out = encoder(encoder.preprocess(torch.randint(0, 256, (2, 512, 512, 3), dtype=torch.uint8)))
    assert out.shape == (2, 512)
    assert not torch.allclose(out.norm(dim=1), torch.ones(2))  # no L2 normalisation


@pytest.fixture(scope="module")
def conch_model():
    with torch.device("meta"):  # filled by the checkpoint, as the loader does
        return ConchVision()


def test_wrong_checkpoints_fail_naming_the_keys(checkpoint, conch_model):
    model = conch_model
    missing = dict(checkpoint)
    del missing["visual.trunk.blocks.3.attn.qkv.weight"]
    missing["visual.trunk.blocks.12.norm1.weight"] = torch.zeros(768)
    with pytest.raises(WeightsUnavailableError) as err:
        load_strict(model, vision_state_dict(missing, model), "conch_v1")
    assert "missing 1: trunk.blocks.3.attn.qkv.weight" in str(err.value)
    assert "unexpected 1: trunk.blocks.12.norm1.weight" in str(err.value)
    shaped = {**checkpoint, "visual.ln_contrast.weight": torch.ones(768)}
    with pytest.raises(WeightsUnavailableError, match=r"wrong shape 1: ln_contrast.weight \(768,\) != \(512,\)"):
        load_strict(model, vision_state_dict(shaped, model), "conch_v1")
    with pytest.raises(WeightsUnavailableError, match="unexpected 1: trunk.blocks.0.attn.qkv.weight"):
        vision_state_dict({"trunk.blocks.0.attn.qkv.weight": torch.zeros(1)}, model)  # a bare ViT, not CONCH


def test_pos_embed_of_another_grid_is_resampled(checkpoint, conch_model):
    model = conch_model
    small = {**checkpoint, "visual.trunk.pos_embed": torch.randn(1, 1 + 14 * 14, 768)}  # trained at 224 px
    state = vision_state_dict(small, model)
    pos = small["visual.trunk.pos_embed"]
    grid = pos[:, 1:].reshape(1, 14, 14, 768).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(28, 28), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(1, 784, 768)
    assert state["trunk.pos_embed"].shape == (1, 785, 768)
    torch.testing.assert_close(state["trunk.pos_embed"][:, :1], pos[:, :1])  # class token kept
    torch.testing.assert_close(state["trunk.pos_embed"][:, 1:], expected)
    load_strict(model, state, "conch_v1")
    assert vision_state_dict(checkpoint, model)["trunk.pos_embed"] is checkpoint["visual.trunk.pos_embed"]


def test_attentional_pooler_equals_multihead_attention_written_out():
    torch.manual_seed(0)
    pool, ln = AttentionalPooler(512, 768, 8, 1).eval(), torch.nn.LayerNorm(512)
    for p in [*pool.parameters(), *ln.parameters()]:
        torch.nn.init.normal_(p, std=0.1)
    tokens = torch.randn(2, 7, 768)
    p = {k: v.detach().double().numpy() for k, v in pool.state_dict().items()}
    x = tokens.double().numpy()

    def layer_norm(v, w, b):
        return (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-5) * w + b

    k_in = layer_norm(x, p["ln_k.weight"], p["ln_k.bias"])
    q_in = layer_norm(p["query"], p["ln_q.weight"], p["ln_q.bias"])  # (1, 512)
    bq, bk, bv = np.split(p["attn.in_proj_bias"], 3)
    q = q_in @ p["attn.q_proj_weight"].T + bq
    k = k_in @ p["attn.k_proj_weight"].T + bk
    v = k_in @ p["attn.v_proj_weight"].T + bv
    heads = []
    for h in range(8):
        s = slice(64 * h, 64 * (h + 1))
        scores = np.einsum("qd,bnd->bqn", q[:, s], k[..., s]) / 8.0
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        heads.append(np.einsum("bqn,bnd->bqd", weights, v[..., s]))
    attended = np.concatenate(heads, -1)[:, 0] @ p["attn.out_proj.weight"].T + p["attn.out_proj.bias"]
    expected = layer_norm(attended, ln.weight.detach().double().numpy(), ln.bias.detach().double().numpy())
    with torch.no_grad():
        got = ln(pool(tokens)[:, 0])
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_resnet50_trunc_from_a_full_resnet50_file_is_layer3_average_pooled(tmp_path):
    import timm

    torch.manual_seed(0)
    full = timm.create_model("resnet50.tv_in1k", pretrained=False).eval()
    torch.save(full.state_dict(), tmp_path / "resnet50.pth")  # with layer4 and fc, as torchvision's files
    encoder = create_encoder("resnet50_trunc", weights=str(tmp_path / "resnet50.pth")).eval()
    captured = {}
    full.layer3.register_forward_hook(lambda m, i, o: captured.update(layer3=o))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full(x)
        got = encoder(x)
    assert got.shape == (2, 1024) and not hasattr(encoder.net, "layer4")
    torch.testing.assert_close(got, captured["layer3"].mean(dim=(2, 3)))
    broken = {k: v for k, v in full.state_dict().items() if k.startswith(("conv1.", "bn1.", "layer1.", "layer2."))}
    with pytest.raises(WeightsUnavailableError, match="missing .*layer3.0.bn1.bias"):
        load_strict(encoder.net, broken, "resnet50_trunc")


@pytest.mark.parametrize("name,size,interp,mean,std,patch", [
    ("resnet50_trunc", 224, Image.BILINEAR, IMAGENET_MEAN, IMAGENET_STD, 256),
    ("conch_v1", 448, Image.BICUBIC, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, 512),
])
def test_preprocessing_matches_pil_resize_and_normalise(name, size, interp, mean, std, patch):
    from methods.encoders.base import Preprocess

    preprocess = Preprocess(size, size, "bilinear" if interp == Image.BILINEAR else "bicubic", mean, std)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (patch // 8, patch // 8, 3)).repeat(8, 0).repeat(8, 1).astype(np.uint8)
    resized = np.asarray(Image.fromarray(image).resize((size, size), interp), np.float64) / 255
    expected = ((resized - mean) / std).transpose(2, 0, 1)
    got = preprocess(torch.from_numpy(image)[None])[0].double().numpy()
    assert got.shape == (3, size, size)
    assert np.abs(got - expected).max() < 2.5 / 255 / min(std)  # PIL rounds to uint8: within ~2 grey levels


def test_timm_models_by_name(tmp_path):
    import timm

    encoder = create_encoder("timm:resnet18", weights="random")
    assert encoder.embed_dim == 512 and encoder.weights == "random"
    cfg = timm.data.resolve_model_data_config(encoder.net)
    assert encoder.preprocess.input_size == cfg["input_size"][-1] and encoder.preprocess.mean == tuple(cfg["mean"])
    with torch.no_grad():
        assert encoder(encoder.preprocess(torch.zeros(1, 256, 256, 3, dtype=torch.uint8))).shape == (1, 512)
    torch.manual_seed(1)
    source = timm.create_model("resnet18", pretrained=False)  # with its classifier
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    loaded = create_encoder("timm:resnet18", weights=str(tmp_path / "r18.pth"), input_size=128)
    torch.testing.assert_close(loaded.net.state_dict()["conv1.weight"], source.state_dict()["conv1.weight"])
    assert loaded.preprocess.input_size == 128
    with pytest.raises(ValueError, match="timm:<model>"):
        create_encoder("timm:")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE with an empty hub cache: nothing can come from the hub."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


@pytest.mark.parametrize("name", ["conch_v1", "resnet50_trunc", "timm:hf-hub:MahmoodLab/UNI"])
def test_offline_hub_says_to_pass_a_file_or_random(offline, name):
    with pytest.raises(WeightsUnavailableError) as err:
        create_encoder(name, weights="hub")
    message = str(err.value)
    assert "HF_HUB_OFFLINE is set" in message and "--weights /path/to/" in message and "--weights random" in message
    assert "\n" not in message


def fake_hub_error(error_class, monkeypatch):
    import huggingface_hub

    response = SimpleNamespace(headers={}, request=None)  # all HfHubHTTPError reads of an HTTP response

    def refuse(*args, **kwargs):
        raise error_class("Access to model MahmoodLab/conch is restricted.", response=response)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)


@pytest.mark.parametrize("error", ["GatedRepoError", "RepositoryNotFoundError"])
def test_gated_conch_without_access_says_how_to_get_it(monkeypatch, error):
    from huggingface_hub import errors

    fake_hub_error(getattr(errors, error), monkeypatch)
    with pytest.raises(WeightsUnavailableError) as err:
        create_encoder("conch_v1", weights="hub")
    message = str(err.value)
    assert "request access at https://huggingface.co/MahmoodLab/conch" in message
    assert "HF_TOKEN" in message and "--weights /path/to/pytorch_model.bin" in message


def test_weights_argument():
    assert parse_weights(None).kind == parse_weights("hub").kind == "hub"
    assert parse_weights("random").kind == "random"
    with pytest.raises(FileNotFoundError, match="--weights hub, --weights random or an existing checkpoint file"):
        parse_weights("/no/such/file.bin")
    assert weights_provenance("conch_v1") == "pretrained:hub:MahmoodLab/conch"
    assert weights_provenance("resnet50_trunc", "random") == "random"
    assert weights_provenance("timm:hf-hub:MahmoodLab/UNI") == "pretrained:hub:MahmoodLab/UNI"


def test_read_state_dict_unwraps_and_strips(tmp_path):
    torch.save({"state_dict": {"module.a": torch.ones(1), "b": torch.zeros(1)}}, tmp_path / "x.pth")
    assert sorted(read_state_dict(tmp_path / "x.pth")) == ["a", "b"]
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="cannot read checkpoint"):
        read_state_dict(tmp_path / "junk.bin")
