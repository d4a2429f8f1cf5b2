import itertools

import pytest
import torch
from hypothesis import given, strategies as st

import kdiff_align as ka
from kdiff_align.cond import cfg_denoiser, condition_denoiser, parse_condition
from kdiff_align.testing import CountingDenoiser


class ToyConditional(torch.nn.Module):
    """D(x, σ, emb) = x/(1+σ²) + emb·σ²/(1+σ²): checks σ is [B] and repeated with x and emb."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, sigma, emb, added=None):
        assert sigma.shape == (x.shape[0],), (sigma.shape, x.shape)
        assert emb.shape[0] == x.shape[0]
        if added is not None:
            assert added["time_ids"].shape[0] == x.shape[0]
            emb = emb + added["time_ids"][:, :1]
        self.calls += 1
        s2 = (sigma**2)[:, None]
        return x / (1 + s2) + emb * s2 / (1 + s2)


def embeddings(n, b, dim=3, seed=0):
    return [{"emb": torch.randn(b, dim, generator=torch.Generator().manual_seed(seed + i))} for i in range(n)]


def test_one_prompt_weight_one_is_conditional():
    model = ToyConditional()
    (cond,), (uncond,) = embeddings(1, 4), embeddings(1, 4, seed=9)
    x, sigma = torch.randn(4, 3), torch.rand(4) + 0.1
    guided = cfg_denoiser(model, [cond], uncond, [1.0])
    torch.testing.assert_close(guided(x, sigma), model(x, sigma, **cond))


def test_weights_zero_give_unconditional():
    model = ToyConditional()
    conds, (uncond,) = embeddings(3, 2), embeddings(1, 2, seed=9)
    x, sigma = torch.randn(2, 3), torch.rand(2) + 0.1
    torch.testing.assert_close(cfg_denoiser(model, conds, uncond, [0.0, 0.0, 0.0])(x, sigma),
                               model(x, sigma, **uncond))


@given(weights=st.lists(st.floats(-5, 10, width=32), min_size=1, max_size=4), seed=st.integers(0, 1000))
def test_matches_formula_and_permutation_invariant(weights, seed):
    model = ToyConditional()
    conds, (uncond,) = embeddings(len(weights), 2, seed=seed), embeddings(1, 2, seed=seed + 99)
    x, sigma = torch.randn(2, 3), torch.rand(2) + 0.1
    d_u = model(x, sigma, **uncond)
    expected = d_u + sum(w * (model(x, sigma, **c) - d_u) for w, c in zip(weights, conds))
    got = cfg_denoiser(model, conds, uncond, weights)(x, sigma)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for perm in itertools.islice(itertools.permutations(range(len(weights))), 6):
        permuted = cfg_denoiser(model, [conds[i] for i in perm], uncond, [weights[i] for i in perm])(x, sigma)
        torch.testing.assert_close(permuted, got, rtol=1e-4, atol=1e-4)


def test_one_network_call_per_step_with_repeated_sigma():
    model = ToyConditional()
    conds, (uncond,) = embeddings(3, 2), embeddings(1, 2, seed=9)
    guided = cfg_denoiser(model, conds, uncond, [2.0, 1.0, 0.5])
    sigmas = ka.get_sigmas_karras(7, 0.1, 5.0)
    ka.odeint(guided, torch.randn(2, 3), sigmas, method="euler", disable=True)
    assert model.calls == 7
    model.calls = 0
    ka.sdeint(guided, torch.randn(2, 3), sigmas, disable=True, generator=torch.Generator().manual_seed(0))
    assert model.calls == 7


def test_max_batch_splits_rows_without_changing_result():
    model = ToyConditional()
    conds, (uncond,) = embeddings(3, 5), embeddings(1, 5, seed=9)
    x, sigma = torch.randn(5, 3), torch.rand(5) + 0.1
    whole = cfg_denoiser(model, conds, uncond, [2.0, 1.0, 0.5])(x, sigma)
    model.calls = 0
    split = cfg_denoiser(model, conds, uncond, [2.0, 1.0, 0.5], max_batch=6)(x, sigma)
    assert model.calls == 4  # 20 rows in calls of <= 6
    torch.testing.assert_close(split, whole)


def test_per_item_weights_and_nested_kwargs():
    model = ToyConditional()
    b = 3
    conds = [{"emb": e["emb"], "added": {"time_ids": torch.randn(b, 2)}} for e in embeddings(2, b)]
    uncond = {"emb": torch.zeros(b, 3), "added": {"time_ids": torch.zeros(b, 2)}}
    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    x, sigma = torch.randn(b, 3), torch.rand(b) + 0.1
    got = cfg_denoiser(model, conds, uncond, weights)(x, sigma)
    torch.testing.assert_close(got[0], model(x, sigma, **conds[0])[0])
    torch.testing.assert_close(got[1], model(x, sigma, **conds[1])[1])


def prompt_encoder(prompts):
    table = {"": 0.0, "cat": 1.0, "dog": -1.0, "bird": 3.0}
    return {"emb": torch.tensor([[table[p]] * 3 for p in prompts])}


def test_condition_dict_and_per_item_list():
    model = CountingDenoiser(ToyConditional())
    x, sigma = torch.randn(2, 3), torch.full((2,), 0.7)
    shared = condition_denoiser(model, {"prompts": ["cat", "dog"], "cfgs": [3.0, 1.0]}, prompt_encoder)
    u = model(x, sigma, emb=torch.zeros(2, 3))
    c = model(x, sigma, emb=torch.ones(2, 3))
    d = model(x, sigma, emb=-torch.ones(2, 3))
    torch.testing.assert_close(shared(x, sigma), u + 3 * (c - u) + (d - u))
    per_item = condition_denoiser(model, [{"prompts": ["cat"], "cfgs": [2.0]},
                                          {"prompts": ["dog", "bird"], "cfgs": [1.0, 0.5]}], prompt_encoder)
    model.calls = model.rows = 0
    out = per_item(x, sigma)
    assert model.calls == 1 and model.rows == 6  # (P_max + 1)·B rows, padded with "" at weight 0
    b = model(x, sigma, emb=torch.full((2, 3), 3.0))
    torch.testing.assert_close(out[0], (u + 2 * (c - u))[0])
    torch.testing.assert_close(out[1], (u + (d - u) + 0.5 * (b - u))[1])


@pytest.mark.parametrize("condition,match", [
    ({"prompts": ["a", "b"], "cfgs": [1.0]}, "2 prompts but 1 cfgs"),
    ({"prompts": "a", "cfgs": [1.0]}, "list of strings"),
    ({"prompts": ["a"], "cfgs": 1.0}, "list of numbers"),
    ({"prompt": ["a"], "cfgs": [1.0]}, "exactly the keys"),
    ([], "non-empty list"),
])
def test_bad_conditions(condition, match):
    with pytest.raises(ValueError, match=match):
        parse_condition(condition)


def test_condition_list_must_match_batch():
    with pytest.raises(ValueError, match="list of 2 dicts but the batch has 3"):
        parse_condition([{"prompts": ["a"], "cfgs": [1]}] * 2, batch_size=3)
    model = ToyConditional()
    guided = condition_denoiser(model, [{"prompts": ["cat"], "cfgs": [1]}] * 2, prompt_encoder)
    with pytest.raises(ValueError, match=r"2 rows \(one per condition.*but x has batch 3"):
        guided(torch.randn(3, 3), torch.ones(3))


def test_cfg_argument_errors():
    model = ToyConditional()
    conds, (uncond,) = embeddings(2, 2), embeddings(1, 2)
    with pytest.raises(ValueError, match="weights must be 2 floats"):
        cfg_denoiser(model, conds, uncond, [1.0])
    with pytest.raises(ValueError, match="same keys"):
        cfg_denoiser(model, [{"other": torch.ones(2, 3)}], uncond, [1.0])
    with pytest.raises(ValueError, match=r"weights has 2 rows \(one per condition.*but x has batch 3"):
        cfg_denoiser(model, embeddings(2, 1), embeddings(1, 1)[0], torch.ones(2, 2))(torch.ones(3, 3), torch.ones(3))


def test_condition_batch_must_match_x():
    model = ToyConditional()
    conds, (uncond,) = embeddings(1, 2), embeddings(1, 2)
    with pytest.raises(ValueError, match="'emb' has batch 2, expected 1 or 3"):
        cfg_denoiser(model, conds, uncond, [1.0])(torch.ones(3, 3), torch.ones(3))


def test_batched_call_broadcasts_batch_one_conditioning_before_chunking():
    """A batch-1 conditioning tensor is shared by all rows: chunking must broadcast it, not slice it
    (rows 3.. of a batch-1 tensor are empty). The answer is the unchunked call, exactly (row-wise model)."""
    from kdiff_align.cond import batched_call
    model = lambda x, sigma, emb, extra: x * sigma[:, None] + emb.sum(1, keepdim=True) + extra["t"]  # noqa: E731
    x, sigma = torch.randn(7, 3), torch.rand(7) + 0.1
    kwargs = {"emb": torch.randn(1, 4), "extra": {"t": torch.randn(1, 3)}}
    whole = model(x, sigma, **kwargs)
    for max_batch in (1, 3, 7, 10):
        torch.testing.assert_close(batched_call(model, x, sigma, kwargs, max_batch), whole, rtol=0, atol=0)
