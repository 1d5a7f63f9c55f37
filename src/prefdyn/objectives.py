"""Preference-alignment objectives as pure functions of sequence log-probabilities.

Every function takes log-probabilities ``log pi(y|x)`` of whole responses, one
entry per example (tensors of shape ``(batch,)``, or any common shape), and
follows the signature of the reference DPO implementation::

    dpo_loss(policy_chosen_logps, policy_rejected_logps,
             reference_chosen_logps, reference_rejected_logps, beta)

"chosen" is the preferred response y_w, "rejected" the dispreferred y_l.

The chain of definitions is the derivation of Rafailov et al. (2023),
"Direct Preference Optimization", arXiv:2305.18290:

* the KL-regularised RLHF optimum pi*(y|x) ∝ pi_ref(y|x) exp(r(x,y)/beta)
  (Eq. 4) inverts to the *implicit reward* (Eq. 5)
      r(x,y) = beta log(pi(y|x)/pi_ref(y|x)) + beta log Z(x);
* in a Bradley–Terry difference r(x,y_w) - r(x,y_l) the partition function
  Z(x) cancels, leaving the *reward margin*;
* maximum likelihood of Bradley–Terry on that margin is the DPO loss (Eq. 7).

IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning
from Human Preferences", arXiv:2310.12036) regresses the same log-ratio
difference onto the constant 1/(2 tau) instead (Eq. 17). This book writes IPO
with beta = 1/tau, the inverse temperature of its optimum pi_ref exp(beta P mu),
so that beta multiplies the reward in the optimum of DPO and IPO alike; the
target margin is then beta/2. TRL's ``DPOTrainer(loss_type="ipo")`` calls tau
itself ``beta``: pass TRL ``beta = 1/beta`` (the one place this mapping is made;
tests/test_objectives.py checks it against TRL's own loss).

The regularisation strength is checked where it enters (the trainer's
:func:`prefdyn.llm.train.preference_loss`, the closed forms of
:mod:`prefdyn.tabular`, each chapter's parameters), not at every step here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "implicit_rewards",
    "reward_margins",
    "dpo_loss",
    "ipo_loss",
    "sft_nll",
    "preference_accuracy",
]


def require_positive(name: str, value) -> None:
    """Raise ``ValueError`` unless the regularisation strength (a number, or a tensor of them) is > 0
    (NaN rejected too)."""
    if not bool(torch.all(torch.as_tensor(value) > 0)):
        raise ValueError(f"{name} must be a positive number (the KL-regularisation strength), got {value!r}")


def implicit_rewards(policy_logps: Tensor, reference_logps: Tensor, beta: float) -> Tensor:
    """Implicit reward beta * log(pi(y|x) / pi_ref(y|x)), Rafailov et al. Eq. 5.

    Eq. 5 reads r(x,y) = beta log(pi_r(y|x)/pi_ref(y|x)) + beta log Z(x); the
    prompt-only term beta log Z(x) is dropped because it cancels in every
    comparison of two responses to the same prompt (TRL's ``rewards/chosen``).
    """
    return beta * (policy_logps - reference_logps)


def reward_margins(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> Tensor:
    """Per-example implicit reward of the chosen minus the rejected response.

    beta log(pi(y_w)/pi_ref(y_w)) - beta log(pi(y_l)/pi_ref(y_l)): the argument
    of the sigmoid in Rafailov et al. Eq. 7 (TRL's ``rewards/margins``).
    """
    chosen_rewards = implicit_rewards(policy_chosen_logps, reference_chosen_logps, beta)
    rejected_rewards = implicit_rewards(policy_rejected_logps, reference_rejected_logps, beta)
    return chosen_rewards - rejected_rewards


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> Tensor:
    """Per-example DPO loss -log sigma(reward margin), Rafailov et al. Eq. 7.

    L_DPO = -E[ log sigma( beta log(pi(y_w)/pi_ref(y_w)) - beta log(pi(y_l)/pi_ref(y_l)) ) ],
    returned before the expectation (average it for the batch loss).
    ``F.logsigmoid`` keeps large negative margins finite.
    """
    margins = reward_margins(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta
    )
    return -F.logsigmoid(margins)


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> Tensor:
    """Per-example sampled IPO loss (h - beta/2)^2: Azar et al. Eq. 17, (h - 1/(2 tau))^2, with the
    book's beta = 1/tau (see the module docstring; TRL's ``beta`` is tau).

    h = log(pi(y_w)/pi_ref(y_w)) - log(pi(y_l)/pi_ref(y_l)) is the log-ratio
    difference, i.e. the reward margin at unit temperature (it is *not* multiplied by beta).
    """
    h = reward_margins(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps, beta=1.0
    )
    return (h - beta / 2) ** 2


def sft_nll(policy_logps: Tensor, n_tokens: Tensor | None = None) -> Tensor:
    """Negative log-likelihood -log pi(y|x) per sequence (per token if ``n_tokens`` is given).

    The supervised fine-tuning objective; with ``n_tokens`` (the completion
    lengths) the sequence NLL is divided by the length, giving the mean token NLL.
    """
    nll = -policy_logps
    return nll if n_tokens is None else nll / n_tokens


def preference_accuracy(chosen_scores: Tensor, rejected_scores: Tensor) -> float:
    """Fraction of pairs in which the chosen response scores strictly higher.

    Scores may be log-probabilities or (implicit) rewards; ties count as wrong,
    as in TRL's ``rewards/accuracies``.
    """
    return (chosen_scores > rejected_scores).to(torch.float64).mean().item()
