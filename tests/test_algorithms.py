"""The three objectives: what their weights promise, on real tensors."""

from __future__ import annotations

import copy

import pytest
import torch

from wmtp_core.config.schema import Critic
from wmtp_core.engine.algorithms import (
    BaselineMTP,
    CriticWMTP,
    Rho1WMTP,
    gae_returns,
    head_ce,
    head_targets,
    masked_softmax,
    shifted,
)
from wmtp_core.engine.model import ModelConfig, MTPModel

CFG = ModelConfig(d_model=32, n_layers=1, n_heads=2, n_future=3, max_seq_len=16)


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return torch.randint(0, 256, (4, 12))


@pytest.fixture
def model():
    torch.manual_seed(1)
    return MTPModel(CFG)


def test_head_k_at_t_targets_token_t_plus_k_plus_1(batch):
    targets, mask = head_targets(batch, 3)
    for k in range(3):
        for t in range(12):
            assert bool(mask[0, k, t]) == (t + k + 1 < 12)
            if mask[0, k, t]:
                assert targets[0, k, t] == batch[0, t + k + 1]


def test_model_outputs_one_distribution_per_head(model, batch):
    assert model(batch).shape == (4, 3, 12, 256)


def test_masked_softmax_sums_to_one_over_valid_heads():
    scores = torch.randn(2, 3, 5)
    mask = torch.ones(2, 3, 5, dtype=torch.bool)
    mask[:, 2, 3:] = False
    mask[:, :, 4] = False
    w = masked_softmax(scores, mask, 0.5)
    assert torch.all(w[~mask] == 0)
    sums = w.sum(dim=1)
    torch.testing.assert_close(sums[:, :4], torch.ones(2, 4))
    assert torch.all(sums[:, 4] == 0)


def test_rho1_weighted_weights_are_a_distribution_over_heads_without_gradient(model, batch):
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    algo = Rho1WMTP(reference, mode="weighted", min_ce_diff=0.0, skip_percentile=0.3, temperature=1.0)
    ce, mask = head_ce(model(batch), batch)
    w = algo.weights(ce, mask, batch)
    assert not w.requires_grad
    valid = mask.any(dim=1)
    torch.testing.assert_close(w.sum(dim=1)[valid], torch.ones(int(valid.sum())))
    loss, metrics = algo.loss(model, batch)
    loss.backward()
    assert model.unembed.weight.grad is not None
    assert {"weight_mean", "weight_std", "ce_head_0"} <= set(metrics)


def test_rho1_compares_the_same_target_token(model, batch):
    """With the model as its own reference, head 0 has zero excess everywhere."""
    ce, mask = head_ce(model(batch), batch)
    ref0 = ce[:, 0]
    shifted_ref, ok = shifted(ref0, 3, 0)
    torch.testing.assert_close(shifted_ref[:, 0], ref0)
    assert torch.equal(shifted_ref[:, 2, :5], ref0[:, 2:7])
    with torch.no_grad():
        from wmtp_core.engine.algorithms import next_token_ce

        own = next_token_ce(model.next_token_logits(batch), batch)
    torch.testing.assert_close(own[:, :-1], ce[:, 0, :-1])


@pytest.mark.parametrize("p", [0.0, 0.25, 0.5, 0.9])
def test_rho1_token_skip_drops_exactly_the_lowest_share_per_sample(model, batch, p):
    reference = MTPModel(CFG)
    algo = Rho1WMTP(reference, mode="token_skip", min_ce_diff=0.0, skip_percentile=p, temperature=1.0)
    ce, mask = head_ce(model(batch), batch)
    w = algo.weights(ce, mask, batch)
    for b in range(batch.shape[0]):
        n = int(mask[b].sum())
        assert int((w[b][mask[b]] == 0).sum()) == int(p * n)
        assert set(w[b][mask[b]].unique().tolist()) <= {0.0, 1.0}


def test_rho1_min_ce_diff_zeroes_small_excess(model, batch):
    algo = Rho1WMTP(copy.deepcopy(model), mode="weighted", min_ce_diff=1e9, skip_percentile=0.0,
                    temperature=1.0)
    ce, mask = head_ce(model(batch), batch)
    w = algo.weights(ce, mask, batch)
    # all excess zeroed: uniform over the valid heads
    counts = mask.sum(dim=1, keepdim=True).clamp_min(1)
    torch.testing.assert_close(w, mask / counts)


def test_gae_with_gamma_and_lambda_one_is_the_sum_of_future_rewards():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    v = torch.tensor([[0.5, -1.0, 2.0, 0.3]])
    torch.testing.assert_close(gae_returns(r, v, 1.0, 1.0), torch.tensor([[10.0, 9.0, 7.0, 4.0]]))
    # lambda 0: one-step TD targets r_t + gamma V_{t+1}
    torch.testing.assert_close(gae_returns(r, v, 0.9, 0.0),
                               torch.tensor([[1 + 0.9 * -1.0, 2 + 0.9 * 2.0, 3 + 0.9 * 0.3, 4.0]]))


def test_critic_weights_exclude_heads_past_the_end_and_train_the_value_head(model, batch):
    algo = CriticWMTP(CFG.d_model, Critic(), temperature=1.0)
    assert len(algo.param_groups()) == 1 and algo.param_groups()[0]["lr"] == Critic().value_lr
    loss, metrics = algo.loss(model, batch)
    loss.backward()
    assert all(p.grad is not None for p in algo.value_head.parameters())
    assert "value_loss" in metrics
    h = model.trunk_hidden(batch)
    ce, mask = head_ce(model.unembed(model.head_hidden(h)), batch)
    v = algo.value_head(h).detach()
    prev = torch.cat([torch.zeros_like(v[:, :1]), v[:, :-1]], dim=1)
    score, ok = shifted(v - Critic().discount_lambda * prev, 3, 1)
    w = masked_softmax(score, mask & ok, 1.0)
    t = batch.shape[1]
    assert torch.all(w[:, :, t - 1] == 0)          # nothing to predict at the last position
    torch.testing.assert_close(w[:, 0, t - 2], torch.ones(batch.shape[0]))  # only head 0 left
    assert torch.all(w[:, 2, t - 3:] == 0)


def test_critic_value_head_is_part_of_the_resume_state(model, batch):
    a = CriticWMTP(CFG.d_model, Critic(), temperature=1.0)
    b = CriticWMTP(CFG.d_model, Critic(), temperature=1.0)
    a.pretrained = True
    b.load_state_dict(a.state_dict())
    assert b.pretrained
    for (ka, va), (kb, vb) in zip(a.value_head.state_dict().items(), b.value_head.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_baseline_scale_is_loss_lambda(model, batch):
    one, _ = BaselineMTP(1.0).loss(model, batch)
    two, _ = BaselineMTP(2.0).loss(model, batch)
    torch.testing.assert_close(two, 2 * one)
