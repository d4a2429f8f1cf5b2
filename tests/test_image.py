import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

import kdiff_align as ka


@given(images=hnp.arrays(np.uint8, st.tuples(st.integers(1, 3), st.sampled_from([1, 3]), st.integers(1, 9),
                                             st.integers(1, 9))))
def test_uint8_round_trip_is_exact(images):
    pils = ka.to_pil(torch.from_numpy(images).float() / 127.5 - 1)
    assert len(pils) == images.shape[0]
    back = ((ka.from_pil(pils) + 1) * 127.5).round().to(torch.uint8).numpy()
    np.testing.assert_array_equal(back, images)


def test_modes_and_single_image():
    gray, rgb = ka.to_pil(torch.zeros(1, 1, 4, 4))[0], ka.to_pil(torch.zeros(2, 3, 4, 4))[1]
    assert gray.mode == "L" and rgb.mode == "RGB" and rgb.size == (4, 4)
    assert ka.from_pil(rgb).shape == (1, 3, 4, 4)


def test_converter_errors():
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        ka.to_pil(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="same size"):
        ka.from_pil([Image.new("RGB", (4, 4)), Image.new("RGB", (5, 4))])
    with pytest.raises(ValueError, match="at least one"):
        ka.from_pil([])


def test_get_init_latent_scale_and_per_item_seeds():
    z = ka.get_init_latent(4, (4, 8, 8), 14.6488, generator=torch.Generator().manual_seed(0))
    assert z.shape == (4, 4, 8, 8) and 12 < z.std().item() < 17
    gens = ka.utils.generators([1, 2, 3])
    alone = ka.get_init_latent(1, (4, 8, 8), 1.0, generator=ka.utils.generators([3]))
    torch.testing.assert_close(ka.get_init_latent(3, (4, 8, 8), 1.0, generator=gens)[2:], alone)


def tiny_vae(tmp_path, scaling=0.5, shift=0.1):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                  latent_channels=4, norm_num_groups=4, layers_per_block=1,
                                  scaling_factor=scaling, shift_factor=shift)
    vae.save_pretrained(tmp_path / "vae")
    return diffusers.AutoencoderKL.from_pretrained(tmp_path / "vae")


def test_latent_converters_on_tiny_vae(tmp_path):
    vae = tiny_vae(tmp_path)
    images = ka.to_pil(torch.rand(3, 3, 16, 16) * 2 - 1)
    z = ka.from_pil_to_latent(vae, images)
    assert z.shape == (3, 4, 8, 8)
    with torch.no_grad():
        raw = vae.encode(ka.from_pil(images)).latent_dist.mean
    torch.testing.assert_close(z, (raw - 0.1) * 0.5)  # scaling and shift from the VAE config
    pils = ka.from_latent_to_pil(vae, z)
    assert len(pils) == 3 and pils[0].size == (16, 16)
    with torch.no_grad():
        direct = ka.to_pil(vae.decode(raw).sample)
    np.testing.assert_array_equal(np.asarray(pils[1]), np.asarray(direct[1]))
