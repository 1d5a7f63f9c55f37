"""Objectives and the tabular theory, checked against independent computations.

References are hand-written numpy formulas, TRL's own ``DPOTrainer`` loss code,
autograd against closed-form gradients, explicit double loops over response
pairs, and gradient descent against the closed-form optima.
"""

from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from prefdyn.llm.train import preference_loss
from prefdyn.objectives import dpo_loss, implicit_rewards, ipo_loss, preference_accuracy, reward_margins, sft_nll
from prefdyn.tabular import (
    bradley_terry,
    ipo_optimum,
    minimise,
    population_dpo_loss,
    population_ipo_loss,
    rlhf_optimum,
)

BATCH = 16
K = 6


def _logps(seed, n=BATCH, scale=3.0):
    """Four random sequence log-prob vectors: policy chosen/rejected, reference chosen/rejected."""
    g = torch.Generator().manual_seed(seed)
    return tuple(-scale * torch.rand(n, generator=g, dtype=torch.float64) for _ in range(4))


def _np_margins(pc, pr, rc, rr, beta):
    pc, pr, rc, rr = (t.numpy() for t in (pc, pr, rc, rr))
    return beta * ((pc - rc) - (pr - rr))


# --- objectives vs hand-written numpy ------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_implicit_rewards_and_margins_match_numpy(beta):
    pc, pr, rc, rr = _logps(0)
    np.testing.assert_allclose(implicit_rewards(pc, rc, beta).numpy(), beta * (pc.numpy() - rc.numpy()), rtol=1e-12)
    np.testing.assert_allclose(
        reward_margins(pc, pr, rc, rr, beta).numpy(), _np_margins(pc, pr, rc, rr, beta), rtol=1e-12, atol=1e-14
    )


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_dpo_loss_matches_numpy(beta):
    pc, pr, rc, rr = _logps(1, scale=300.0)  # margins of hundreds: logsigmoid must stay finite
    expected = np.logaddexp(0.0, -_np_margins(pc, pr, rc, rr, beta))  # -log sigma(m) = log(1 + e^{-m})
    np.testing.assert_allclose(dpo_loss(pc, pr, rc, rr, beta).numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("tau", [0.1, 0.5, 2.0])
def test_ipo_loss_matches_numpy(tau):
    pc, pr, rc, rr = _logps(2)
    h = (pc.numpy() - rc.numpy()) - (pr.numpy() - rr.numpy())  # log-ratio difference, not scaled by tau
    np.testing.assert_allclose(ipo_loss(pc, pr, rc, rr, 1 / tau).numpy(), (h - 1 / (2 * tau)) ** 2, rtol=1e-12)  # beta = 1/tau


def test_sft_nll_per_sequence_and_per_token():
    logps = torch.tensor([-12.0, -3.0, -40.0], dtype=torch.float64)
    n_tokens = torch.tensor([4, 1, 10])
    np.testing.assert_allclose(sft_nll(logps).numpy(), [12.0, 3.0, 40.0])
    np.testing.assert_allclose(sft_nll(logps, n_tokens).numpy(), [3.0, 3.0, 4.0])


def test_preference_accuracy_counts_ties_as_wrong():
    chosen = torch.tensor([1.0, 2.0, 3.0, 4.0])
    rejected = torch.tensor([0.0, 2.0, 5.0, 1.0])
    assert preference_accuracy(chosen, rejected) == 0.5


def test_dpo_gradient_is_closed_form():
    """d/d log pi(y_w) of -log sigma(m) is -beta sigma(-m); of log pi(y_l) it is +beta sigma(-m)."""
    beta = 0.7
    pc, pr, rc, rr = _logps(3)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    dpo_loss(pc, pr, rc, rr, beta).sum().backward()
    weight = 1 / (1 + np.exp(_np_margins(pc.detach(), pr.detach(), rc, rr, beta)))  # sigma(-m)
    np.testing.assert_allclose(pc.grad.numpy(), -beta * weight, rtol=1e-12)
    np.testing.assert_allclose(pr.grad.numpy(), beta * weight, rtol=1e-12)


@pytest.mark.parametrize(
    "call",
    [
        lambda t, bad: preference_loss("dpo", bad),
        lambda t, bad: preference_loss("ipo", bad),
        lambda t, bad: rlhf_optimum(t, t, bad),
        lambda t, bad: ipo_optimum(t, bradley_terry(t), torch.softmax(t, -1), bad),
    ],
)
@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_a_nonpositive_beta_is_refused_where_it_enters(call, bad):
    """Where beta enters (the trainer's loss, the closed forms), not at every step of the per-example losses."""
    with pytest.raises(ValueError, match="must be a positive number"):
        call(torch.zeros(3), bad)


# --- objectives vs TRL's DPOTrainer --------------------------------------------------------------


class _SequenceLogProbModel:
    """Stands in for the language model inside TRL's loss.

    Each sequence is a one-token prompt followed by a one-token completion, and
    the model reports the given sequence log-prob as that token's log-prob, so
    TRL's sum over completion tokens returns it unchanged.
    """

    training = True

    def __init__(self, logps):
        self.logps = logps

    def __call__(self, input_ids, **kwargs):
        per_token = self.logps[:, None]
        return SimpleNamespace(
            log_probs=per_token,
            entropy=torch.zeros_like(per_token),
            mean_logits=torch.zeros_like(per_token),
            is_top1=torch.zeros_like(per_token, dtype=torch.bool),
        )


def _trl_per_example(loss_type, beta, pc, pr, rc, rr):
    """Per-example loss, reward margin and reward accuracy from ``trl.DPOTrainer._compute_loss``.

    TRL has no standalone loss function: the loss lives in the trainer method,
    which runs the model itself.  We build the trainer with ``object.__new__``,
    set the attributes ``_compute_loss`` reads to the values ``__init__`` gives
    them for a default ``DPOConfig`` (reverse-KL DPO, no length weighting,
    reference log-probs precomputed into the batch), and feed one pair per call
    so the batch mean is the per-example value.
    """
    trl = pytest.importorskip("trl", minversion="1.0")  # the loss moved into _compute_loss in TRL 1.x
    trainer = object.__new__(trl.DPOTrainer)
    trainer.beta = beta
    trainer.loss_types = [loss_type]
    trainer.loss_weights = [1.0]
    trainer.f_divergence_type = "reverse_kl"
    trainer.ld_alpha = None
    trainer.use_weighting = False
    trainer.aux_loss_enabled = False
    trainer.precompute_ref_logps = True
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    trainer.accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t)
    one_token_completion = torch.tensor([[0, 1], [0, 1]])  # rows: [chosen, rejected]
    losses = []
    for i in range(len(pc)):
        trainer.model = _SequenceLogProbModel(torch.stack([pc[i], pr[i]]))
        inputs = {
            "input_ids": torch.zeros(2, 2, dtype=torch.long),
            "attention_mask": torch.ones(2, 2, dtype=torch.long),
            "completion_mask": one_token_completion,
            "ref_chosen_logps": rc[i : i + 1],
            "ref_rejected_logps": rr[i : i + 1],
        }
        losses.append(trainer._compute_loss(trainer.model, inputs, return_outputs=False))
    metrics = trainer._metrics["train"]
    return torch.stack(losses), np.array(metrics["rewards/margins"]), np.mean(metrics["rewards/accuracies"])


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_dpo_loss_matches_trl_sigmoid_loss(beta):
    pc, pr, rc, rr = _logps(4)
    trl_losses, trl_margins, trl_accuracy = _trl_per_example("sigmoid", beta, pc, pr, rc, rr)
    margins = reward_margins(pc, pr, rc, rr, beta)
    assert 0 < trl_accuracy < 1  # both signs of margin occur
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta), trl_losses, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(margins.numpy(), trl_margins, rtol=1e-12, atol=1e-12)
    chosen_rewards, rejected_rewards = implicit_rewards(pc, rc, beta), implicit_rewards(pr, rr, beta)
    assert preference_accuracy(chosen_rewards, rejected_rewards) == pytest.approx(trl_accuracy)


@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_ipo_loss_matches_trl_ipo_loss(tau):
    """TRL's ``beta`` is IPO's tau, the book's ``beta`` its inverse; with one completion token TRL's
    length normalisation is the identity."""
    pc, pr, rc, rr = _logps(5)
    trl_losses, _, _ = _trl_per_example("ipo", tau, pc, pr, rc, rr)
    torch.testing.assert_close(ipo_loss(pc, pr, rc, rr, 1 / tau), trl_losses, rtol=1e-12, atol=1e-12)


# --- the tabular world ---------------------------------------------------------------------------


def _tabular_problem(seed, n_prompts=3, k=K):
    """Random log pi_ref, reward r, and behaviour distribution mu (full support, within ~3x of uniform)."""
    g = torch.Generator().manual_seed(seed)
    log_pi_ref = torch.log_softmax(torch.randn(n_prompts, k, generator=g, dtype=torch.float64), -1)
    r = torch.randn(n_prompts, k, generator=g, dtype=torch.float64)
    mu = torch.softmax(0.5 * torch.randn(n_prompts, k, generator=g, dtype=torch.float64), -1)
    return log_pi_ref, r, mu


def _random_preferences(seed, n_prompts=3, k=K):
    """P = sigma(S) with S antisymmetric: a valid preference matrix that is in general not Bradley–Terry."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n_prompts, k, k, generator=g, dtype=torch.float64)
    return torch.sigmoid(a - a.transpose(-1, -2))


def test_bradley_terry_matrix():
    r = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    P = bradley_terry(r).numpy()
    expected = 1 / (1 + np.exp(-(r.numpy()[:, None] - r.numpy()[None, :])))
    np.testing.assert_allclose(P, expected, rtol=1e-12)
    np.testing.assert_allclose(P + P.T, np.ones((3, 3)), rtol=1e-12)


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_rlhf_optimum_has_implicit_reward_r_up_to_a_constant(beta):
    """beta log(pi*/pi_ref) - r = -beta log Z(x): the same for every response of a prompt (Rafailov Eq. 5)."""
    log_pi_ref, r, _ = _tabular_problem(0)
    log_pi = rlhf_optimum(log_pi_ref, r, beta)
    offset = (beta * (log_pi - log_pi_ref) - r).numpy()
    np.testing.assert_allclose(offset, np.broadcast_to(offset[:, :1], offset.shape), atol=1e-12)
    np.testing.assert_allclose(np.exp(log_pi.numpy()).sum(-1), 1.0, rtol=1e-12)


def test_ipo_optimum_solves_the_normal_equations():
    """g(y) - E_mu[g] = (P(y ≻ mu) - 1/2)/tau with g = log(pi*/pi_ref), written out in numpy."""
    tau = 0.8
    log_pi_ref, _, mu = _tabular_problem(1)
    P = _random_preferences(1)
    g = (ipo_optimum(log_pi_ref, P, mu, 1 / tau) - log_pi_ref).numpy()
    mu_np, P_np = mu.numpy(), P.numpy()
    win_rate = np.einsum("nij,nj->ni", P_np, mu_np)
    lhs = g - (mu_np * g).sum(-1, keepdims=True)
    np.testing.assert_allclose(lhs, (win_rate - 0.5) / tau, atol=1e-12)


def _brute_force_population_loss(pair_loss, logits, log_pi_ref, P, mu):
    """sum over prompts n, winners i, losers j of mu_i mu_j P_ij * pair_loss(h_ij), with plain Python floats."""
    log_pi = torch.log_softmax(logits, -1).tolist()
    log_pi_ref, P, mu = log_pi_ref.tolist(), P.tolist(), mu.tolist()
    totals = []
    for n in range(len(log_pi)):
        total = 0.0
        for i in range(len(log_pi[n])):
            for j in range(len(log_pi[n])):
                h = (log_pi[n][i] - log_pi_ref[n][i]) - (log_pi[n][j] - log_pi_ref[n][j])
                total += mu[n][i] * mu[n][j] * P[n][i][j] * pair_loss(h)
        totals.append(total)
    return np.array(totals)


def test_population_dpo_loss_is_the_double_sum_over_pairs():
    beta = 0.7
    log_pi_ref, r, mu = _tabular_problem(2)
    logits = torch.randn(3, K, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    P = _random_preferences(2)
    expected = _brute_force_population_loss(lambda h: np.logaddexp(0.0, -beta * h), logits, log_pi_ref, P, mu)
    np.testing.assert_allclose(population_dpo_loss(logits, log_pi_ref, P, mu, beta).numpy(), expected, rtol=1e-12)


def test_population_ipo_loss_is_the_double_sum_over_pairs():
    tau = 0.7
    log_pi_ref, r, mu = _tabular_problem(3)
    logits = torch.randn(3, K, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    P = _random_preferences(3)
    expected = _brute_force_population_loss(lambda h: (h - 1 / (2 * tau)) ** 2, logits, log_pi_ref, P, mu)
    np.testing.assert_allclose(population_ipo_loss(logits, log_pi_ref, P, mu, 1 / tau).numpy(), expected, rtol=1e-12)


def _max_log_error(logits, log_pi_star):
    return (torch.log_softmax(logits, -1) - log_pi_star).abs().max().item()


@pytest.mark.parametrize("beta", [0.5, 1.0, 2.0])
def test_gradient_descent_on_population_dpo_reaches_rlhf_optimum(beta):
    log_pi_ref, r, mu = _tabular_problem(4)
    target = rlhf_optimum(log_pi_ref, r, beta)
    logits0 = torch.zeros_like(log_pi_ref)
    assert _max_log_error(logits0, target) > 0.1
    logits = minimise(
        lambda z: population_dpo_loss(z, log_pi_ref, bradley_terry(r), mu, beta), logits0, 2000, lr=8 / beta**2
    )
    assert _max_log_error(logits, target) < 1e-6


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("preferences", ["bradley_terry", "general"])
def test_gradient_descent_on_population_ipo_reaches_ipo_optimum(tau, preferences):
    log_pi_ref, r, mu = _tabular_problem(5)
    P = bradley_terry(r) if preferences == "bradley_terry" else _random_preferences(5)
    target = ipo_optimum(log_pi_ref, P, mu, 1 / tau)
    logits0 = torch.zeros_like(log_pi_ref)
    assert _max_log_error(logits0, target) > 0.1
    logits = minimise(lambda z: population_ipo_loss(z, log_pi_ref, P, mu, 1 / tau), logits0, 2000, lr=2.0)
    assert _max_log_error(logits, target) < 1e-6


# rock, paper, scissors: P[y, y'] = 1 if y beats y'. The preferences are cyclic, so no reward rationalises them.
ROCK_PAPER_SCISSORS = torch.tensor([[0.5, 0.0, 1.0], [1.0, 0.5, 0.0], [0.0, 1.0, 0.5]], dtype=torch.float64)


def test_ipo_on_rock_paper_scissors_tilts_towards_what_beats_mu():
    """With mu = (0.6, 0.2, 0.2) the win rates P mu are (0.5, 0.7, 0.3): pi* ∝ pi_ref exp(P mu / tau) favours paper."""
    tau = 0.5
    log_pi_ref = torch.full((3,), -np.log(3.0), dtype=torch.float64)
    mu = torch.tensor([0.6, 0.2, 0.2], dtype=torch.float64)
    logits = minimise(
        lambda z: population_ipo_loss(z, log_pi_ref, ROCK_PAPER_SCISSORS, mu, 1 / tau), torch.zeros(3), 2000, lr=2.0
    )
    tilt = np.exp(np.array([0.5, 0.7, 0.3]) / tau)
    np.testing.assert_allclose(torch.softmax(logits, -1).numpy(), tilt / tilt.sum(), atol=1e-7)
    assert _max_log_error(logits, ipo_optimum(log_pi_ref, ROCK_PAPER_SCISSORS, mu, 1 / tau)) < 1e-6


def test_ipo_on_rock_paper_scissors_with_uniform_mu_stays_at_reference():
    """Every response wins half the time against uniform mu, so there is no tilt: pi* = pi_ref."""
    tau = 0.5
    log_pi_ref = torch.log(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    mu = torch.full((3,), 1 / 3, dtype=torch.float64)
    logits = minimise(
        lambda z: population_ipo_loss(z, log_pi_ref, ROCK_PAPER_SCISSORS, mu, 1 / tau), torch.zeros(3), 2000, lr=2.0
    )
    assert _max_log_error(logits, log_pi_ref) < 1e-6
