import pytest
import torch

import kdiff_align as ka
from kdiff_align.external import DiffusersDenoiser, DiscreteDenoiser, KarrasDenoiser
from kdiff_align.schedules import sigmas_from_alphas_cumprod
from kdiff_align.testing import GaussianDenoiser

from tiny import ExactNet, alphas_cumprod


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_discrete_wrapper_recovers_exact_denoiser(prediction_type):
    gaussian = GaussianDenoiser(torch.tensor([0.5, -1.0, 2.0]), 0.8)
    table = sigmas_from_alphas_cumprod(alphas_cumprod())
    model = DiscreteDenoiser(ExactNet(gaussian, table, prediction_type), alphas_cumprod(), prediction_type)
    x = torch.randn(6, 3) * 3
    sigma = torch.tensor([0.03, 0.1, 0.5, 1.0, 5.0, 14.0])
    # σ → t → σ goes through log-σ interpolation: round trip within float32 precision
    torch.testing.assert_close(model(x, sigma), gaussian(x, sigma), rtol=1e-4, atol=1e-4)
    assert model.sigma_max == pytest.approx(14.6146, abs=1e-3)


def test_wrapped_model_runs_odeint():
    gaussian = GaussianDenoiser(torch.zeros(3), 1.0)
    table = sigmas_from_alphas_cumprod(alphas_cumprod())
    model = DiscreteDenoiser(ExactNet(gaussian, table, "epsilon"), alphas_cumprod())
    sigmas = ka.get_sigmas_karras(20, model.sigma_min, model.sigma_max)
    x_T = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)) * model.sigma_max
    torch.testing.assert_close(ka.odeint(model, x_T, sigmas, disable=True), ka.odeint(gaussian, x_T, sigmas, disable=True),
                               rtol=1e-3, atol=1e-3)


def test_unknown_prediction_type():
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        DiscreteDenoiser(lambda x, t: x, alphas_cumprod(), "flow")


def test_karras_preconditioning_with_zero_net_is_skip():
    model = KarrasDenoiser(lambda x, c_noise: torch.zeros_like(x), sigma_data=0.5)
    x, sigma = torch.randn(3, 2), torch.tensor([0.1, 1.0, 10.0])
    torch.testing.assert_close(model(x, sigma), x * (0.25 / (sigma**2 + 0.25))[:, None])


def test_diffusers_unet2d_through_wrapper(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                 down_block_types=("DownBlock2D", "DownBlock2D"), norm_num_groups=4,
                                 up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1)
    unet.save_pretrained(tmp_path / "unet")
    unet = diffusers.UNet2DModel.from_pretrained(tmp_path / "unet")
    scheduler = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    model = DiffusersDenoiser(unet, scheduler)
    sigmas = ka.get_sigmas_karras(4, model.sigma_min, model.sigma_max)
    x0 = ka.odeint(model, torch.randn(2, 1, 8, 8) * model.sigma_max, sigmas, disable=True)
    assert x0.shape == (2, 1, 8, 8) and torch.isfinite(x0).all()
    # the UNet sees c_in·x and the interpolated t
    with torch.no_grad():
        x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([1.0, 3.0])
        t = model.sigma_to_t(sigma)
        eps = unet(x / (sigma**2 + 1).sqrt()[:, None, None, None], t).sample
        torch.testing.assert_close(model(x, sigma), x - sigma[:, None, None, None] * eps)
