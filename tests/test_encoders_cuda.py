"""On the GPU: bf16 autocast + channels-last features agree with fp32 CPU features."""
import pytest
import torch

from methods.encoders import create_encoder

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("name,patch", [("resnet50_trunc", 256), ("conch_v1", 512)])
def test_bf16_channels_last_features_match_fp32(name, patch):
    from methods.features import encode, prepare_encoder

    torch.manual_seed(0)
    patches = torch.randint(0, 256, (8, patch, patch, 3), dtype=torch.uint8)
    encoder = create_encoder(name, weights="random").eval()
    with torch.no_grad():
        reference = encoder(encoder.preprocess(patches))
    fast = torch.from_numpy(encode(prepare_encoder(encoder, "cuda"), patches.pin_memory(), "cuda"))
    cosine = torch.nn.functional.cosine_similarity(fast, reference, dim=1)
    assert fast.shape == reference.shape and fast.dtype == torch.float32
    assert cosine.min() > 0.99, cosine
