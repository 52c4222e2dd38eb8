"""The discrete (VQ-Diffusion) process against brute force on a vocabulary of 5: closed forms, posterior, guidance."""

from __future__ import annotations

import pytest
import torch

from diffusion.discrete import (
    MaskSchedule,
    discrete_loss,
    guided_log_x0,
    log_posterior,
    log_q_xt_given_x0,
    q_sample,
    truncate,
)

K, T = 5, 10


def step_matrix(schedule: MaskSchedule, t: int) -> torch.Tensor:
    """The one-step transition q(x_t | x_{t-1}) as a (K+1) x (K+1) matrix [from, to], built from its definition."""
    a, g, _ = schedule.cumulative()
    alpha = a[t] / a[t - 1]
    gamma = 1 - (1 - g[t]) / (1 - g[t - 1])
    beta = (1 - alpha - gamma) / K
    q = torch.zeros(K + 1, K + 1, dtype=torch.float64)
    q[:K, :K] = beta
    q[:K, :K] += torch.eye(K, dtype=torch.float64) * alpha
    q[:K, K] = gamma
    q[K, K] = 1.0
    return q


def product(schedule: MaskSchedule, s: int, t: int) -> torch.Tensor:
    """q(x_t | x_s) by multiplying the one-step matrices s+1..t."""
    q = torch.eye(K + 1, dtype=torch.float64)
    for step in range(s + 1, t + 1):
        q = q @ step_matrix(schedule, step)
    return q


@pytest.fixture
def schedule():
    return MaskSchedule(num_codes=K, num_timesteps=T, alpha_end=0.05, gamma_end=0.9)


def test_closed_form_marginal_equals_repeated_one_step_transitions(schedule):
    for t in (1, 4, T):
        brute = product(schedule, 0, t)[:K]  # rows: x0 (a code), columns: x_t
        x0 = torch.arange(K)
        log_x0 = torch.log(torch.nn.functional.one_hot(x0, K).float().clamp(min=1e-40)).T[None]  # [1, K, N=K]
        got = log_q_xt_given_x0(schedule, log_x0, torch.tensor([t])).exp()[0].T  # [N, K+1]
        torch.testing.assert_close(got.double(), brute, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got.sum(1), torch.ones(K))


@pytest.mark.parametrize(("s", "t"), [(0, 1), (3, 4), (2, 7), (0, T), (5, T)])
def test_log_space_posterior_equals_brute_force_bayes(schedule, s, t):
    """sum_x0 p(x0) q(x_s | x_t, x0) by Bayes on the matrices, for every x_t (codes and [MASK]); skipped steps too."""
    torch.manual_seed(0)
    p0 = torch.softmax(torch.randn(K + 1, K, dtype=torch.float64) * 2, dim=1)  # one x0 distribution per x_t
    q0s, qst, q0t = product(schedule, 0, s)[:K], product(schedule, s, t), product(schedule, 0, t)[:K]
    x_t = torch.arange(K + 1)
    brute = torch.zeros(K + 1, K + 1, dtype=torch.float64)
    for n, xt in enumerate(x_t.tolist()):
        for x0 in range(K):
            brute[n] += p0[n, x0] * q0s[x0] * qst[:, xt] / q0t[x0, xt]
    got = (
        log_posterior(
            schedule, torch.log(p0.float()).T[None], x_t[None], torch.tensor([s]), torch.tensor([t])
        )
        .exp()[0]
        .T
    )
    torch.testing.assert_close(got.double(), brute, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.sum(1), torch.ones(K + 1))


def test_guidance_scale_one_is_the_conditional_and_zero_the_unconditional_prediction():
    torch.manual_seed(0)
    cond, null = (torch.log_softmax(torch.randn(2, K, 3), dim=1) for _ in range(2))
    torch.testing.assert_close(guided_log_x0(cond, null, 1.0), cond)
    torch.testing.assert_close(guided_log_x0(cond, null, 0.0), null)
    torch.testing.assert_close(guided_log_x0(cond, null, 3.0).exp().sum(1), torch.ones(2, 3))


def test_truncation_at_one_changes_nothing_and_low_r_keeps_the_top_code():
    torch.manual_seed(0)
    log_p = torch.log_softmax(torch.randn(2, K, 4), dim=1)
    assert torch.equal(truncate(log_p, 1.0), log_p)
    top = truncate(log_p, 1e-3).exp()
    assert torch.equal(top.argmax(1), log_p.argmax(1)) and torch.allclose(top.max(1).values, torch.ones(2, 4))
    half = truncate(log_p, 0.5).exp()
    kept = (half > 0).sum(1)
    assert (kept >= 1).all() and (kept < K).any()  # a nucleus: fewer codes, still a distribution
    torch.testing.assert_close(half.sum(1), torch.ones(2, 4))


def test_forward_process_masks_everything_at_the_end_and_little_at_the_start():
    schedule = MaskSchedule(num_codes=K, num_timesteps=100)
    x0 = torch.randint(0, K, (4, 256), generator=torch.Generator().manual_seed(0))
    early = q_sample(schedule, x0, torch.full((4,), 1), torch.Generator().manual_seed(1))
    late = q_sample(schedule, x0, torch.full((4,), 100), torch.Generator().manual_seed(1))
    assert (early == x0).float().mean() > 0.99 and (late == K).float().mean() > 0.99


def test_loss_is_zero_for_a_perfect_prediction_only_in_its_kl_part(schedule):
    """With the true x0 predicted (almost) surely, the KL terms vanish; the loss then is aux_weight * ~0."""
    torch.manual_seed(0)
    x0 = torch.randint(0, K, (3, 8))
    t = torch.tensor([1, 4, T])
    x_t = q_sample(schedule, x0, t)
    perfect = torch.log(torch.nn.functional.one_hot(x0, K).permute(0, 2, 1).float() * (1 - 1e-6) + 1e-6 / K)
    wrong = torch.log_softmax(torch.randn(3, K, 8), dim=1)
    assert discrete_loss(schedule, perfect, x0, x_t, t, 0.1).max() < 1e-3
    assert (
        discrete_loss(schedule, wrong, x0, x_t, t, 0.1) > discrete_loss(schedule, perfect, x0, x_t, t, 0.1)
    ).all()


def _tiny_discrete(codes: int = 6):
    from diffusion.config import model_config
    from diffusion.model import build_network

    mc = model_config(
        "tiny",
        cond_dim=8,
        k=2,
        backbone="discrete",
        latent_factor=2,
        latent_channels=3,
        codebook_size=codes,
        cond_drop_prob=0.0,
    )
    torch.manual_seed(0)
    return build_network(mc, num_timesteps=20), mc


def test_a_tiny_token_denoiser_overfits_a_few_token_grids_and_samples_them_back():
    """Four 8 x 8 grids, each with its own condition: after training, ancestral sampling from all-[MASK]
    (10 skipped steps of T = 20) draws each condition's grid."""
    from diffusion.discrete import discrete_diffusion_loss, sample_tokens

    model, mc = _tiny_discrete()
    schedule = MaskSchedule(num_codes=6, num_timesteps=20)
    g = torch.Generator().manual_seed(0)
    grids = torch.stack([torch.full((8, 8), c) for c in range(4)])
    grids[:, :, 4:] = (grids[:, :, 4:] + 2) % 6  # two codes per grid, left and right halves
    tokens = grids.flatten(1)
    cond = {
        "query": torch.randn(4, 8, generator=g) * 3,
        "neighbours": torch.randn(4, 2, 8, generator=g),
        "valid": torch.ones(4, 2, dtype=torch.bool),
    }
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(150):
        loss = discrete_diffusion_loss(model, tokens, cond, schedule, 0.0, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    out = sample_tokens(
        model, cond, schedule, 64, steps=10, guidance=1.0, generator=torch.Generator().manual_seed(1)
    )
    assert (out == tokens).float().mean() > 0.95, (out == tokens).float().mean(1)


def test_discrete_sampling_is_deterministic_for_a_seed():
    from diffusion.discrete import sample_tokens

    model, _ = _tiny_discrete()
    schedule = MaskSchedule(num_codes=6, num_timesteps=20)
    cond = {
        "query": torch.randn(3, 8),
        "neighbours": torch.randn(3, 2, 8),
        "valid": torch.ones(3, 2, dtype=torch.bool),
    }

    def run(seed: int) -> torch.Tensor:
        return sample_tokens(
            model.eval(), cond, schedule, 64, 5, 2.0, 0.9, torch.Generator().manual_seed(seed)
        )

    first = run(0)
    assert torch.equal(first, run(0)) and not torch.equal(first, run(1))
    assert first.max() < 6  # no [MASK] left after the last step


def test_a_requests_token_samples_depend_on_its_seed_not_on_its_batch():
    """The service's batches: with RequestNoise, request A's token grids are the same alone and batched behind B."""
    from diffusion.discrete import sample_tokens
    from diffusion.samplers import RequestNoise

    model, _ = _tiny_discrete()
    schedule = MaskSchedule(num_codes=6, num_timesteps=20)
    g = torch.Generator().manual_seed(0)
    a = {"query": torch.randn(2, 8, generator=g), "neighbours": torch.randn(2, 2, 8, generator=g)}
    b = {"query": torch.randn(1, 8, generator=g), "neighbours": torch.randn(1, 2, 8, generator=g)}
    for c in (a, b):
        c["valid"] = torch.ones(len(c["query"]), 2, dtype=torch.bool)

    def run(groups: list[tuple[int, int]], cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return sample_tokens(model.eval(), cond, schedule, 64, 5, 2.0, 1.0, RequestNoise(groups))

    alone = run([(7, 2)], a)
    batched = run([(3, 1), (7, 2)], {k: torch.cat([b[k], a[k]]) for k in a})
    assert torch.equal(batched[1:], alone)
    assert (run([(8, 2)], a) != alone).float().mean() > 0.2


def test_sampling_truncates_by_default_and_r_one_turns_it_off():
    from diffusion.discrete import TRUNCATION, sample_tokens
    from diffusion.evaluate import EvaluateConfig
    from diffusion.sample import SampleConfig

    model, _ = _tiny_discrete()
    g = torch.Generator().manual_seed(0)
    for (
        p
    ) in model.parameters():  # an untrained network predicts nearly uniform codes, which r = 0.9 all keeps
        p.data += 0.3 * torch.randn(p.shape, generator=g)
    schedule = MaskSchedule(num_codes=6, num_timesteps=20)
    cond = {"query": torch.randn(4, 8, generator=g), "neighbours": torch.randn(4, 2, 8, generator=g)}
    cond["valid"] = torch.ones(4, 2, dtype=torch.bool)

    def run(**r: float) -> torch.Tensor:
        return sample_tokens(
            model.eval(), cond, schedule, 64, 5, 2.0, generator=torch.Generator().manual_seed(0), **r
        )

    default = run()
    assert 0 < TRUNCATION < 1 and torch.equal(default, run(truncation=TRUNCATION))
    assert not torch.equal(default, run(truncation=1.0))
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="--truncation"):
            SampleConfig(checkpoint="run", database="db", output="out", truncation=bad)
        with pytest.raises(ValueError, match="--truncation"):
            EvaluateConfig(
                checkpoints={"a": "run"}, database="db", heldout_parts=["00000"], output="o", truncation=bad
            )
