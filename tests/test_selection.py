"""KL calibration selection: exactness of masked evaluation, disjoint probe, determinism."""

import copy

import pytest
import torch

from nirvana_lightning import cut, select_calibration
from nirvana_lightning.debug_models import build_tiny_model
from nirvana_lightning.errors import ConfigError
from nirvana_lightning.pruning import check_disjoint, mean_token_kl
from nirvana_lightning.pruning.selection import compute_dense_logprobs


def _candidates(k=4, n=4, t=16, seed=0):
    return [torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed + i)) for i in range(k)]


PROBE = torch.randint(0, 256, (6, 12), generator=torch.Generator().manual_seed(99))


def test_kl_of_dense_to_itself_is_zero(tiny):
    dense = compute_dense_logprobs(tiny, PROBE, batch_size=4)
    kl, ppl = mean_token_kl(tiny, PROBE, dense, batch_size=4, token_chunk=7)
    assert kl == 0.0 and ppl > 1
    result = select_calibration(tiny, _candidates(2), PROBE, sparsity=0.0, gamma=1.0, progress=False)
    assert result.kls == [0.0, 0.0] and result.best_index == 0


def test_selection_picks_the_minimum_leaves_weights_and_matches_physical_pruning(tiny, granularity):
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    result = select_calibration(tiny, _candidates(4), PROBE, sparsity=0.4, gamma=1.5, progress=False,
                                probe_batch_size=4, attention_granularity=granularity)
    assert result.plan.granularity == granularity
    assert all(torch.equal(v, state[k]) for k, v in tiny.state_dict().items())  # bit-identical
    assert result.best_index == min(range(4), key=lambda i: result.kls[i])
    assert len(result.kls) == 4 and all(kl > 0 for kl in result.kls)
    assert result.plan.provenance["selection"]["winner_fingerprint"] == result.fingerprints[result.best_index]
    pruned = copy.deepcopy(tiny)
    cut(pruned, result.plan)
    dense = compute_dense_logprobs(tiny, PROBE, batch_size=4)
    kl, ppl = mean_token_kl(pruned, PROBE, dense, batch_size=4)
    assert kl == pytest.approx(result.kls[result.best_index], rel=1e-5)
    assert ppl == pytest.approx(result.perplexities[result.best_index], rel=1e-5)


def test_selection_is_deterministic(family):
    runs = [select_calibration(build_tiny_model(family), _candidates(3), PROBE, sparsity=0.4, gamma=1.5,
                               progress=False) for _ in range(2)]
    assert runs[0].kls == runs[1].kls and runs[0].best_index == runs[1].best_index
    assert runs[0].plan.fingerprint() == runs[1].plan.fingerprint()


def test_overlapping_probe_is_rejected(tiny):
    cands = _candidates(3, t=40)
    leaky = torch.cat([PROBE, cands[2][:1, 4:16]])
    with pytest.raises(ConfigError, match="candidate 2"):
        select_calibration(tiny, cands, leaky, sparsity=0.3, progress=False)
    with pytest.raises(ConfigError, match="disjoint from candidate 0"):
        check_disjoint(cands, PROBE, [[("s", 0, 40)], [("s", 100, 40)], [("s", 200, 40)]], [("s", 30, 12)])
    check_disjoint(cands, PROBE, [[("s", 0, 40)]] * 3, [("t", 0, 12)])  # other stream: fine


def test_datamodule_candidates_and_probe_are_disjoint():
    from nirvana_lightning.data import NirvanaDataModule

    dm = NirvanaDataModule(tokenizer="tiny-llama", seq_len=32, val_fraction=0.1)
    cands, spans = dm.calibration_candidates(3, 4, 32, 0, "random")
    probe, probe_spans = dm.probe_windows(16, 32, 0)
    assert len(cands) == 3 and cands[0].shape == (4, 32) and probe.shape == (16, 32)
    assert not torch.equal(cands[0], cands[1])
    check_disjoint(cands, probe, spans, probe_spans)
    again, _ = dm.calibration_candidates(3, 4, 32, 0, "random")
    assert all(torch.equal(a, b) for a, b in zip(cands, again))
    docs, doc_spans = dm.calibration_candidates(3, 4, 32, 0, mode="document")
    assert all(len({s for _, s, _ in sp}) == len(sp) for sp in doc_spans)
    with pytest.raises(ConfigError, match=r"selection\.candidate_mode='bogus'"):
        dm.calibration_candidates(2, 4, 32, 0, mode="bogus")
