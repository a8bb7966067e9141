"""The ImageNet classifier is the WSI model's body: same parameter names and shapes, and on one image the
same final tokens as the WSI model on that image's regions; the token ops on a batch of bags are the
one-bag ops per image."""
import pytest
import torch

from methods.pixel_mamba.classifier import PixelMambaClassifier, pixel_mamba_classifier
from methods.pixel_mamba.layers import H_AVG, H_CAT, V_AVG, V_CAT
from methods.pixel_mamba.model import IMAGENET_MEAN, IMAGENET_STD, pixel_mamba
from methods.pixel_mamba.token_ops import deserialize, region_fusion, serialize, token_expansion


@pytest.mark.parametrize("size", ["6m", "21m"])
def test_body_has_the_wsi_models_parameter_names_and_shapes(size):
    classifier = PixelMambaClassifier(size, num_classes=1000)
    wsi = pixel_mamba(size, n_classes=2)
    body = {k: v.shape for k, v in classifier.state_dict().items() if not k.startswith("head.")}
    assert body == {k: v.shape for k, v in wsi.state_dict().items() if k.startswith("layers.")}
    assert set(classifier.state_dict()) - set(body) == {"head.norm.weight", "head.fc.weight", "head.fc.bias"}
    assert classifier.head.norm.weight.shape == wsi.head.norm.weight.shape  # fine-tuning starts from it


def test_an_image_gives_the_wsi_models_tokens_for_its_regions():
    torch.manual_seed(0)
    classifier = pixel_mamba_classifier("pixel_mamba_6m", num_classes=3, alpha=1.0)
    wsi = pixel_mamba("6m", n_classes=3, alpha=1.0)
    wsi.load_state_dict(classifier.state_dict(), strict=False)
    images = torch.randn(2, 3, 64, 96)  # 2 x 3 regions each
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        tokens, sizes = classifier.features(images)
        for i in range(2):
            # the WSI model takes RGB 0..255 regions in zigzag order: row 0 left to right, row 1 back
            rgb = (images[i] * std + mean) * 255
            regions = rgb.permute(1, 2, 0).reshape(2, 32, 3, 32, 3).transpose(1, 2).reshape(6, 32, 32, 3)
            wsi_tokens, wsi_sizes = wsi.features(regions[[0, 1, 2, 5, 4, 3]])
            torch.testing.assert_close(tokens[i], wsi_tokens, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(sizes[i], wsi_sizes)
    assert tokens.shape == (2, 1, 384) and sizes.sum(1).tolist() == [6.0, 6.0]


@pytest.mark.parametrize("ties", [False, True])
def test_batched_region_fusion_is_the_wsi_op_per_image(ties):
    torch.manual_seed(1)
    x, sizes = torch.randn(4, 9, 2, 4, 5), torch.rand(4, 9) + 0.5
    if ties:  # every region one of two patterns: many pairs equally similar, broken as in one bag
        x = x[0, :2][torch.randint(0, 2, (4, 9))]
    merged, new_sizes = region_fusion(x, sizes, 3)
    assert merged.shape == (4, 6, 2, 4, 5)
    for i in range(4):
        expected, expected_sizes = region_fusion(x[i], sizes[i], 3)
        assert torch.equal(merged[i], expected) and torch.equal(new_sizes[i], expected_sizes)
    same, same_sizes = region_fusion(x[:, :1], sizes[:, :1], 3)  # one region: nothing to merge
    assert torch.equal(same, x[:, :1]) and torch.equal(same_sizes, sizes[:, :1])


def test_batched_serialisation_and_expansion_are_per_image():
    x = torch.randn(3, 2, 4, 4, 6)
    seq = serialize(x)
    assert seq.shape == (3, 32, 6) and torch.equal(seq[1], serialize(x[1])[0])
    assert torch.equal(deserialize(seq, x.shape), x)
    for te in (H_CAT, H_AVG, V_CAT, V_AVG):
        expanded = token_expansion(x, te)
        assert all(torch.equal(expanded[i], token_expansion(x[i], te)) for i in range(3)), te


def test_forward_backward_and_refusals():
    torch.manual_seed(0)
    model = pixel_mamba_classifier("pixel_mamba_6m", num_classes=5)
    logits = model(torch.randn(2, 3, 32, 64))
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    logits.logsumexp(1).sum().backward()
    assert model.layers[0].mixer.in_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="multiples of 32"):
        model(torch.randn(1, 3, 48, 32))
    with pytest.raises(ValueError, match="choose one of pixel_mamba_6m"):
        pixel_mamba_classifier("pixel_mamba_7m", 10)
    assert {"layers.0.mixer.A_log", "layers.0.mixer.A_b_log", "layers.0.mixer.D", "layers.0.mixer.D_b"} <= model.no_weight_decay()
