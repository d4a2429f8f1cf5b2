"""The generic Pipeline (seed notebook API) on a closed-form conditional toy."""
import torch

from tiny import toy_pipeline


def test_seed_snippets_run_and_condition_is_applied():
    pipe = toy_pipeline()
    x = pipe.get_init_latent(3, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 4, 4)
    x0 = pipe.odeint(x, {"prompts": ["abcd"], "cfgs": [1]}, 20, disable=True)
    torch.testing.assert_close(x0.mean(), torch.tensor(1.0), atol=0.2, rtol=0)  # offset 1 at cfg 1
    assert pipe.denoiser.calls == 20 * 2 - 1  # Heun: 2 per step, 1 on the last; one call per evaluation


def test_prompt_embeddings_are_cached():
    pipe = toy_pipeline()
    calls = []
    encode = pipe.encode_prompts
    pipe.encode_prompts = lambda prompts: calls.append(list(prompts)) or encode(prompts)
    for _ in range(3):
        pipe.guided({"prompts": ["ab", "c"], "cfgs": [2, 1]})
    assert sum(len(c) for c in calls) == 3  # "", "ab", "c" once each


def test_revert_then_sample_reconstructs():
    pipe = toy_pipeline()
    cond = {"prompts": ["ab"], "cfgs": [1]}
    x0 = pipe.odeint(pipe.get_init_latent(2, generator=torch.Generator().manual_seed(1)), cond, 40, disable=True)
    again = pipe.odeint(pipe.oderevert(x0, cond, steps=40, disable=True), cond, 40, disable=True)
    torch.testing.assert_close(again, x0, atol=1e-2, rtol=0)
