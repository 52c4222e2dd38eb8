"""The generator's parts without Ray: network, condition handling, guidance, samplers, loss, configs."""

from __future__ import annotations

import itertools

import pytest
import torch

from diffusion.config import ModelConfig, load_yaml, model_config
from diffusion.loss import diffusion_loss
from diffusion.model import build_network
from diffusion.precond import EpsDenoiser, eps_from_output, prediction_target
from diffusion.samplers import (
    CFGDenoiser,
    RequestNoise,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
)
from diffusion.schedule import cosine_alphas_cumprod, q_sample, sampling_timesteps

T = 100


ARCHS = {"unet": {}, "dit": {"arch": "dit", "patch_size": 2, "depth": 2}}


def tiny(arch: str = "unet", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_network(model_config("tiny", cond_dim=8, **ARCHS[arch], **overrides))
    for p in (
        model.parameters()
    ):  # zero-initialised outputs start at the identity; perturb so outputs depend on all
        p.data += 0.05 * torch.randn_like(p)
    return model.eval()


def cond_of(b: int, k: int = 4, d: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "query": torch.randn(b, d, generator=g),
        "neighbours": torch.randn(b, k, d, generator=g),
        "valid": torch.ones(b, k, dtype=torch.bool),
    }


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_shapes_and_condition_use(arch):
    model = tiny(arch)
    x, t, cond = torch.randn(3, 3, 16, 16), torch.tensor([0, 50, 99]), cond_of(3)
    out = model(x, t, **cond)
    assert out.shape == x.shape
    other = dict(cond, neighbours=torch.randn(3, 4, 8))
    assert not torch.allclose(model(x, t, **other), out)  # the neighbours matter
    # missing neighbours become null tokens: their embeddings no longer matter
    missing = dict(cond, valid=torch.tensor([[True, False, True, False]] * 3))
    again = dict(missing, neighbours=torch.where(missing["valid"][..., None], cond["neighbours"], 7.0))
    torch.testing.assert_close(model(x, t, **missing), model(x, t, **again))
    # a dropped condition is the same whatever it was
    drop = torch.ones(3, dtype=torch.bool)
    torch.testing.assert_close(model(x, t, drop=drop, **cond), model(x, t, drop=drop, **cond_of(3, seed=9)))
    # dropping the query alone: the query no longer matters, the neighbours still do
    dq = torch.ones(3, dtype=torch.bool)
    torch.testing.assert_close(
        model(x, t, drop_query=dq, **cond), model(x, t, drop_query=dq, **dict(cond, query=torch.randn(3, 8)))
    )
    assert not torch.allclose(model(x, t, drop_query=dq, **cond), model(x, t, drop_query=dq, **other))
    with pytest.raises(ValueError, match="neighbour"):
        model(x, t, query=cond["query"])
    # memory format and device moves work (Ray Train's prepare_model moves the module)
    cl = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(
        cl(x.to(memory_format=torch.channels_last), t, **cond), out, atol=1e-5, rtol=1e-5
    )


def test_no_knn_variant_takes_the_query_only():
    model = tiny(use_knn=False)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 4])
    assert model(x, t, query=torch.randn(2, 8)).shape == x.shape
    assert model.cond(torch.randn(2, 8)).shape == (2, 1, 32)
    # without neighbours, dropping "the query alone" would drop everything: it is ignored
    q = torch.randn(2, 8)
    torch.testing.assert_close(model.cond(q, drop_query=torch.ones(2, dtype=torch.bool)), model.cond(q))


def test_paper_preset_is_about_400m_parameters():
    with torch.device("meta"):
        model = build_network(model_config("paper"))
    n = sum(p.numel() for p in model.parameters())
    assert 350e6 < n < 450e6, n


def test_v_prediction_round_trip_and_min_snr_weighting():
    """eps recovered from the v target is the noise; the wrapped network hands samplers eps; min-SNR weights the
    per-sample loss by min(SNR, gamma) / (SNR + 1) for v (Hang et al. 2023)."""
    abar = cosine_alphas_cumprod(T).float()
    g = torch.Generator().manual_seed(0)
    x0, noise, t = (
        torch.rand(6, 3, 4, 4, generator=g) * 2 - 1,
        torch.randn(6, 3, 4, 4, generator=g),
        torch.arange(0, 96, 16),
    )
    xt = q_sample(x0, t, noise, abar)
    for prediction in ("eps", "v"):
        target = prediction_target(x0, noise, abar[t], prediction)
        torch.testing.assert_close(
            eps_from_output(target, xt, abar[t], prediction), noise, atol=1e-5, rtol=1e-5
        )

    class Oracle(torch.nn.Module):  # predicts the exact v of the draws above
        def forward(self, x, tt, **cond):
            return prediction_target(x0, noise, abar[tt], "v")

    torch.testing.assert_close(EpsDenoiser(Oracle(), abar, "v")(xt, t), noise, atol=1e-5, rtol=1e-5)

    class Zero(torch.nn.Module):
        def forward(self, x, tt, drop=None, **cond):
            return torch.zeros_like(x)

    x0 = torch.ones(256, 3, 2, 2)
    plain = diffusion_loss(Zero(), x0, {}, abar, 0.0, torch.Generator().manual_seed(1), prediction="v")
    weighted = diffusion_loss(
        Zero(), x0, {}, abar, 0.0, torch.Generator().manual_seed(1), prediction="v", min_snr_gamma=5.0
    )
    tt = torch.randint(0, T, (256,), generator=torch.Generator().manual_seed(1))  # the loss's own draw
    a = abar[tt]
    snr = a / (1 - a)
    # predicting 0 for v = sqrt(a) eps - sqrt(1 - a) x0 with x0 = 1 costs E||v||^2 = a + (1 - a) = 1 per value
    assert plain.item() == pytest.approx(1.0, rel=0.1)
    expected = (snr.clamp(max=5.0) / (snr + 1)).mean().item()
    assert weighted.item() == pytest.approx(expected, rel=0.15)


def test_guidance_one_is_conditional_and_zero_unconditional():
    model = tiny()
    x, cond = torch.randn(2, 3, 16, 16), cond_of(2)
    t = torch.full((2,), 40)
    c = model(x, t, drop=torch.zeros(2, dtype=torch.bool), **cond)
    u = model(x, t, drop=torch.ones(2, dtype=torch.bool), **cond)
    torch.testing.assert_close(CFGDenoiser(model, cond, 1.0)(x, 40), c, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(CFGDenoiser(model, cond, 0.0)(x, 40), u, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(CFGDenoiser(model, cond, 3.0)(x, 40), u + 3 * (c - u), atol=1e-5, rtol=1e-5)


def test_samplers_are_deterministic_with_a_seed():
    model, cond, abar = tiny(), cond_of(2), cosine_alphas_cumprod(T)
    steps = sampling_timesteps(T, 10)
    for sampler in (sample_ddpm, sample_ddim, sample_dpmpp_2m, sample_dpmpp_2m_sde):
        runs = []
        for _ in range(2):
            g = torch.Generator().manual_seed(5)
            x = torch.randn(2, 3, 16, 16, generator=g)
            runs.append(sampler(CFGDenoiser(model, cond, 2.0), x, steps, abar, generator=g))
        torch.testing.assert_close(runs[0], runs[1], atol=0, rtol=0)
        assert runs[0].abs().max() <= 1.0 + 1e-5  # ends at the (clipped) data prediction


def test_a_requests_ancestral_samples_depend_on_its_seed_not_on_its_batch():
    """The service batches requests: with RequestNoise, request A's rows (x_T and every DDPM step's noise) are the
    same alone and batched behind B; one shared generator would hand A another part of its stream."""
    model, abar = tiny(), cosine_alphas_cumprod(T)
    steps = sampling_timesteps(T, 5)

    a, b = cond_of(2), cond_of(1, seed=2)

    def run(groups: list[tuple[int, int]], cond: dict[str, torch.Tensor]) -> torch.Tensor:
        gen = RequestNoise(groups)
        x = gen.draw(torch.randn, (gen.rows, 3, 16, 16))
        return sample_ddpm(CFGDenoiser(model, cond, 2.0), x, steps, abar, generator=gen)

    alone = run([(7, 2)], a)
    batched = run([(3, 1), (7, 2)], {k: torch.cat([b[k], a[k]]) for k in a})
    torch.testing.assert_close(batched[1:], alone, atol=1e-5, rtol=0)
    assert (run([(8, 2)], a) - alone).abs().mean() > 0.05
    with pytest.raises(ValueError, match="cover 3"):
        RequestNoise([(1, 1), (2, 2)]).draw(torch.rand, (4, 2))


def test_ddim_with_eta_one_over_all_steps_is_ddpm():
    model, cond, abar = tiny(), cond_of(2), cosine_alphas_cumprod(T)
    steps = sampling_timesteps(T, T)
    out = []
    for sampler, kw in ((sample_ddpm, {}), (sample_ddim, {"eta": 1.0})):
        g = torch.Generator().manual_seed(3)
        out.append(
            sampler(
                CFGDenoiser(model, cond, 1.5),
                torch.randn(2, 3, 16, 16, generator=g),
                steps,
                abar,
                generator=g,
                **kw,
            )
        )
    torch.testing.assert_close(out[0], out[1], atol=1e-4, rtol=1e-4)


def test_deterministic_samplers_converge_with_more_steps():
    """DDIM (eta=0) and DPM-Solver++(2M) solve the same ODE: they agree more closely as steps grow."""
    model, cond, abar = tiny(), cond_of(1), cosine_alphas_cumprod(T)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    denoiser = CFGDenoiser(model, cond, 1.0)
    ref = sample_ddim(denoiser, x, sampling_timesteps(T, T), abar, clip_x0=False)
    errors = []
    for n in (5, 20):
        ddim = sample_ddim(denoiser, x, sampling_timesteps(T, n), abar, clip_x0=False)
        dpm = sample_dpmpp_2m(denoiser, x, sampling_timesteps(T, n), abar, clip_x0=False)
        errors.append(((ddim - ref).abs().mean().item(), (dpm - ref).abs().mean().item()))
    assert errors[1][0] < errors[0][0] and errors[1][1] < errors[0][1]
    assert errors[0][1] < errors[0][0]  # the second-order solver is closer at few steps


class GaussianData:
    """Data x0 ~ N(mu, s^2) per pixel: its exact denoiser and the closed forms the samplers must reproduce.

    For x_t = sqrt(abar) x0 + sqrt(1 - abar) eps, E[x0 | x_t] = mu + sqrt(abar) s^2 / v (x_t - sqrt(abar) mu)
    with v = abar s^2 + 1 - abar (Gaussian conditioning), and the probability-flow ODE maps x_T to
    mu + s / sqrt(v_T) (x_T - sqrt(abar_T) mu): a monotone map that carries N(sqrt(abar_T) mu, v_T) onto the data.
    """

    mu, s = 0.3, 0.5

    def __init__(self, abar: torch.Tensor) -> None:
        self.abar = abar.double()

    def x0(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.mu + a.sqrt() * self.s**2 / (a * self.s**2 + 1 - a) * (x.double() - a.sqrt() * self.mu)

    def __call__(self, x: torch.Tensor, t: int) -> torch.Tensor:  # the exact eps denoiser
        a = self.abar[t]
        return ((x.double() - a.sqrt() * self.x0(x, a)) / (1 - a).sqrt()).float()

    def ode_solution(self, x: torch.Tensor, t: int) -> torch.Tensor:
        a = self.abar[t]
        return self.mu + self.s / (a * self.s**2 + 1 - a).sqrt() * (x.double() - a.sqrt() * self.mu)


def test_samplers_match_closed_forms_on_gaussian_data():
    abar = cosine_alphas_cumprod(T)
    data = GaussianData(abar)
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    # one DDIM step into abar = 1 is the posterior mean (Tweedie); so is DPM-Solver++'s first step
    for sampler in (sample_ddim, sample_dpmpp_2m):
        out = sampler(data, x, [60], abar, clip_x0=False).double()
        torch.testing.assert_close(out, data.x0(x, abar[60].double()), atol=1e-5, rtol=0)
    # both solve the probability-flow ODE: DDIM to first order, DPM-Solver++(2M) to second order
    exact = data.ode_solution(x, T - 1)
    errors = {}
    for name, sampler in (("ddim", sample_ddim), ("dpmpp_2m", sample_dpmpp_2m)):
        errors[name] = [
            (sampler(data, x, sampling_timesteps(T, n), abar, clip_x0=False).double() - exact)
            .abs()
            .max()
            .item()
            for n in (20, 40, 80)
        ]
    ddim, dpm = errors["ddim"], errors["dpmpp_2m"]
    assert all(1.6 < a / b < 2.4 for a, b in itertools.pairwise(ddim)), ddim  # error halves per doubling
    assert all(a / b > 3.5 for a, b in itertools.pairwise(dpm)), dpm  # error quarters (or better)
    assert dpm[-1] < 0.01 and dpm[-1] < ddim[-1] / 5


def test_sde_dpm_solver_steps_like_ddpm_first_and_samples_the_data_distribution():
    """SDE-DPM-Solver++(2M): its first-order step is DDPM's posterior step (same noise draws), and with the exact
    denoiser of Gaussian data its 20 steps carry x_T ~ N(sqrt(abar_T) mu, v_T) onto N(mu, s^2)."""
    abar = cosine_alphas_cumprod(T)
    data = GaussianData(abar)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    one, two = (
        sampler(data, x, [60, 30], abar, generator=torch.Generator().manual_seed(1), clip_x0=False)
        for sampler in (sample_ddpm, sample_dpmpp_2m_sde)
    )
    torch.testing.assert_close(one, two, atol=1e-5, rtol=0)
    a_t = abar[T - 1].double()
    x_t = a_t.sqrt() * data.mu + (a_t * data.s**2 + 1 - a_t).sqrt() * torch.randn(
        200_000, generator=torch.Generator().manual_seed(2), dtype=torch.float64
    )
    out = sample_dpmpp_2m_sde(
        data, x_t.float(), sampling_timesteps(T, 20), abar, torch.Generator().manual_seed(3), clip_x0=False
    ).double()
    assert abs(out.mean().item() - data.mu) < 0.01 and abs(out.std().item() - data.s) < 0.02, (
        out.mean().item(),
        out.std().item(),
    )
    # and it is not the ODE sampler: the same start lands elsewhere for another noise seed
    other = sample_dpmpp_2m_sde(
        data,
        x_t[:1000].float(),
        sampling_timesteps(T, 20),
        abar,
        torch.Generator().manual_seed(4),
        clip_x0=False,
    )
    assert (other.double() - out[:1000]).abs().mean() > 0.05


def test_ddpm_matches_the_variance_recursion_of_its_gaussian_posterior():
    """Ancestral sampling with the exact x0 is a linear Gaussian chain; its output mean and variance follow from
    q(x_prev | x_t, x0) written by Gaussian conditioning (not the sampler's own coefficients)."""
    abar = cosine_alphas_cumprod(T)
    data = GaussianData(abar)
    steps = sampling_timesteps(T, 10)
    x = torch.randn(400_000, generator=torch.Generator().manual_seed(0))
    out = sample_ddpm(
        data, x, steps, abar, generator=torch.Generator().manual_seed(1), clip_x0=False
    ).double()
    mean, var = torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    for i, t in enumerate(steps):
        a = abar[t].double()
        a_prev = abar[steps[i + 1]].double() if i + 1 < len(steps) else torch.tensor(1.0, dtype=torch.float64)
        cov, var_t = (a / a_prev).sqrt() * (1 - a_prev), 1 - a  # of x_prev and x_t given x0
        gain = data.s**2 * a.sqrt() / (a * data.s**2 + 1 - a)  # d x0_hat / d x_t
        c_x0, c_xt = a_prev.sqrt() - cov / var_t * a.sqrt(), cov / var_t  # posterior mean coefficients
        slope = c_x0 * gain + c_xt
        mean = c_x0 * (data.mu - gain * a.sqrt() * data.mu) + slope * mean
        var = slope**2 * var + (1 - a_prev - cov**2 / var_t)
    assert abs(out.mean().item() - mean.item()) < 0.005
    assert abs(out.std().item() / var.sqrt().item() - 1) < 0.01, (out.std().item(), var.sqrt().item())
    assert var.sqrt().item() < 0.95 * data.s  # ten steps shrink the spread: the recursion is not trivially s


def test_tiny_model_overfits_a_handful_of_images():
    """Four flat images with a square each: the images it reconstructs from noisy versions (t in [20, 80) of
    100) get far closer to the originals, and the training loss falls."""
    torch.manual_seed(0)
    model = build_network(model_config("tiny", cond_dim=8, cond_drop_prob=0.0))
    x0 = torch.rand(4, 3, 1, 1).expand(4, 3, 16, 16).clone() * 2 - 1
    for i in range(4):
        x0[i, :, 4 * i : 4 * i + 6, 4:10] = -x0[i, :, :1, :1]
    cond = cond_of(4)
    abar = cosine_alphas_cumprod(T).float()
    eval_gen = torch.Generator().manual_seed(123)
    t_eval = torch.randint(20, 80, (64,), generator=eval_gen)
    noise_eval = torch.randn(64, 3, 16, 16, generator=eval_gen)
    big = {k: v.repeat(16, *([1] * (v.dim() - 1))) for k, v in cond.items()}

    def held_out_loss() -> float:
        with torch.no_grad():
            xt = q_sample(x0.repeat(16, 1, 1, 1), t_eval, noise_eval, abar)
            a = abar[t_eval].view(-1, 1, 1, 1)
            x0_hat = (xt - (1 - a).sqrt() * model(xt, t_eval, **big)) / a.sqrt()
            return torch.nn.functional.mse_loss(x0_hat, x0.repeat(16, 1, 1, 1)).item()

    before = held_out_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(400):
        loss = diffusion_loss(
            model,
            x0.repeat(4, 1, 1, 1),
            {k: v.repeat(4, *([1] * (v.dim() - 1))) for k, v in cond.items()},
            abar,
            0.0,
            gen,
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = held_out_loss()
    assert after < 0.1 * before, (before, after)
    assert sum(losses[-40:]) < 0.7 * sum(losses[:40])


def test_bf16_autocast_matches_fp32_and_is_chosen_only_where_fast(monkeypatch):
    """Mixed precision: the loss and its gradients under bf16 autocast agree with fp32 (same draws), and
    "auto" picks bf16 only where the hardware computes it fast (CUDA with bf16, CPUs with AMX)."""
    import retrieval.clip_model
    from diffusion.train import autocast_dtype

    model = tiny()
    x0 = torch.rand(8, 3, 16, 16) * 2 - 1
    cond = cond_of(8)
    abar = cosine_alphas_cumprod(T).float()
    results = []
    for dtype in (None, torch.bfloat16):
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False):
            loss = diffusion_loss(model, x0, cond, abar, 0.0, torch.Generator().manual_seed(0))
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((loss.item(), grads))
    (fp32_loss, fp32_grads), (bf16_loss, bf16_grads) = results
    assert torch.isfinite(bf16_grads).all()
    assert abs(bf16_loss - fp32_loss) < 0.02 * fp32_loss, (fp32_loss, bf16_loss)
    assert torch.nn.functional.cosine_similarity(fp32_grads, bf16_grads, dim=0) > 0.99
    cpu = torch.device("cpu")
    assert autocast_dtype(cpu, "fp32") is None and autocast_dtype(cpu, "bf16") is torch.bfloat16
    monkeypatch.setattr(retrieval.clip_model, "cpu_flags", lambda: {"avx512f"})
    assert autocast_dtype(cpu, "auto") is None
    monkeypatch.setattr(retrieval.clip_model, "cpu_flags", lambda: {"avx512f", "amx_bf16"})
    assert autocast_dtype(cpu, "auto") is torch.bfloat16


def test_q_sample_and_schedule():
    abar = cosine_alphas_cumprod(1000)
    assert abar[0] > 0.999 and abar[-1] < 1e-4 and (abar.diff() < 0).all()
    x0, noise = torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    xt = q_sample(x0, torch.tensor([0, 999]), noise, abar)
    torch.testing.assert_close(xt[0], abar[0].sqrt().float() * x0[0])
    assert sampling_timesteps(1000, 4) == [999, 666, 333, 0]


def test_config_validation_and_yaml(tmp_path):
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ModelConfig(arch="dit", image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="width"):
        ModelConfig(
            arch="dit", width=32, num_heads=2, patch_size=4
        )  # 48 values per patch through 32 channels
    with pytest.raises(ValueError, match="halve"):
        ModelConfig(image_size=18, widths=[8, 16, 32], num_heads=2)  # 18 -> 9 -> no third level
    with pytest.raises(ValueError, match="arch"):
        ModelConfig(arch="transformer")
    with pytest.raises(ValueError, match="preset"):
        model_config("huge")
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: tiny\n  k: 3\nsteps: 7\nbatch_size_per_worker: 2\n")
    config = load_yaml(str(path), db="d", neighbours="n", output="o")
    assert config.model.k == 3 and config.model.width == 32 and config.steps == 7
    path.write_text("stpes: 7\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_yaml(str(path), db="d", neighbours="n", output="o")
