"""The model-free parts of prefdyn.llm.features: length batches and the memoised weights digest (the
features themselves are tested on the real models in test_models.py)."""
import torch

from prefdyn.llm import features
from prefdyn.llm.models import weights_digest


def test_length_batches_group_similar_lengths_within_both_limits():
    lengths = [50, 10, 30, 10, 90, 30, 20, 200, 40, 10]
    batches = features.length_batches(lengths, batch_size=3, tokens=100)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))        # each index once
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(lengths)                                                   # in order of length
    for b in batches:
        assert len(b) <= 3 and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 100)
    assert [7] in batches                              # longer than the token budget: a batch of its own
    assert features.length_batches([], 4) == []


def test_the_digest_is_hashed_again_only_when_a_weight_changes(monkeypatch):
    model = torch.nn.Linear(3, 2)
    calls = []
    monkeypatch.setattr(features, "weights_digest", lambda m: calls.append(1) or weights_digest(m))
    first = features.current_digest(model)
    assert features.current_digest(model) == first and len(calls) == 1
    with torch.no_grad():
        model.weight.mul_(2.0)                         # in place, as an optimiser step
    changed = features.current_digest(model)
    assert changed != first and len(calls) == 2
    model.load_state_dict({"weight": model.weight / 2.0, "bias": model.bias})
    assert features.current_digest(model) == first and len(calls) == 3
