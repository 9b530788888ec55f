"""T5 (encoder-decoder): both debug models, tiny-t5 (v1.1, gated-GELU) and tiny-t5-v1 (v1.0, ReLU), through every
invariant the decoder-only families hold: pruned = masked (heads cut in block 0 of both stacks and in middle
blocks), relative-bias columns follow the original heads, parameters = plan, scores = plain autograd, export =
reload in a fresh process, iterative composition, KL selection, the allocation formula, and the CLI run."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from nirvana_lightning import ConfigError, cut, load_pruned, make_plan, masked_units, save_pruned
from nirvana_lightning.debug_models import SEQ2SEQ_TINY, build_tiny_model
from nirvana_lightning.families import get_family
from nirvana_lightning.pruning.api import count_parameters
from nirvana_lightning.pruning.gradients import compute_unit_scores
from nirvana_lightning.pruning.plan import PruningPlan, compose_plans
from nirvana_lightning.recovery.objectives import lm_loss

IDS = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
# layers 0-2: encoder blocks, 3-5: decoder blocks (4 heads each). Block 0 of both stacks and the middle blocks lose
# heads; encoder head 2 is kept only in block 1 (block 0 lost it); decoder head 3 is kept nowhere.
KEEP_SELF = [[1, 3], [0, 2, 3], [0, 1, 3], [2], [0, 1], [1, 2]]
KEEP_CROSS = [[], [], [], [0, 3], [1], [0, 1, 2]]


@pytest.fixture(params=SEQ2SEQ_TINY)
def name(request) -> str:
    return request.param


def _hand_plan(model) -> PruningPlan:
    """A plan with the kept units above (and a random 3/4 of the neurons), from the sparsity-0 plan's shapes."""
    plan = make_plan(model, None, sparsity=0.0, criterion="magnitude")
    gen = torch.Generator().manual_seed(3)
    mlp = [sorted(torch.randperm(n, generator=gen)[: 3 * n // 4].tolist()) for n in plan.mlp_dim_before]
    return dataclasses.replace(plan, keep={"kv_group": KEEP_SELF, "cross_head": KEEP_CROSS, "neuron": mlp},
                               provenance={})


def _outputs(model, ids=IDS):
    kwargs, _ = get_family(model).model_inputs(ids)
    with torch.no_grad():
        logits = model(**kwargs).logits
        tokens = model.generate(input_ids=kwargs["input_ids"][:2], max_new_tokens=6, do_sample=False)
    return logits, tokens


def test_pruned_equals_masked_with_heads_cut_in_block_zero_of_both_stacks(name):
    model = build_tiny_model(name)
    plan = _hand_plan(model)
    with masked_units(model, plan):
        masked_logits, masked_tokens = _outputs(model)
    cut(model, plan)
    logits, tokens = _outputs(model)
    assert torch.allclose(logits, masked_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(tokens, masked_tokens)  # cached greedy decoding: the bias of later positions too
    attn = [get_family(model).attention_modules(layer) for layer in get_family(model).layers()]
    assert [a["kv_group"].n_heads for a in attn] == [len(k) for k in KEEP_SELF]
    assert [a["cross_head"].n_heads for a in attn[3:]] == [len(k) for k in KEEP_CROSS[3:]]
    # the cross-attention cache shrinks with its heads: k/v of the encoder output
    assert [a["cross_head"].k.out_features for a in attn[3:]] == [16 * len(k) for k in KEEP_CROSS[3:]]


def test_each_block_reads_its_original_heads_bias_columns(name):
    """Block 0 of each stack owns the bias table; a later block whose heads were renumbered reads the columns of its
    original heads, also a head block 0 lost, and a column no block kept is never read."""
    dense = build_tiny_model(name)
    plan = _hand_plan(dense)
    pruned = copy.deepcopy(dense)
    cut(pruned, plan)
    family = get_family(pruned)
    assert [a.nirvana_head_index for layer in family.layers()
            for k, a in family.attention_modules(layer).items() if k == "kv_group"] == KEEP_SELF
    encoder_table = lambda m: m.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight  # noqa: E731
    decoder_table = lambda m: m.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight  # noqa: E731
    assert encoder_table(pruned).shape[1] == 4  # the full table stays
    before, _ = _outputs(pruned)
    for table, column, read in ((encoder_table, 2, True), (decoder_table, 3, False)):
        for m in (dense, pruned):
            with torch.no_grad():
                table(m)[:, column] += 1.0
        with masked_units(dense, plan):
            want, _ = _outputs(dense)
        got, _ = _outputs(pruned)
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)  # the masked dense model reads the same columns
        assert (not torch.equal(got, before)) == read
        before = got


def test_parameter_counts_equal_the_plan(name):
    model = build_tiny_model(name)
    plan = _hand_plan(model)
    before = count_parameters(model)
    assert before["block"] == plan.block_params_before
    cut(model, plan)
    after = count_parameters(model)
    assert after["block"] == plan.block_params_after
    assert before["total"] - after["total"] == plan.block_params_before - plan.block_params_after


def _check_by_hand(model, scores, f) -> None:
    """Autograd of ``f(model)`` with respect to the block weights, then |w * grad| summed over each unit's slices."""
    family = get_family(model)
    for p in model.parameters():  # the weights scored (a gradient on the embeddings too changes SDPA's kernel)
        p.requires_grad_(False)
    for _, _, lin in family.block_linears():
        lin.weight.requires_grad_(True)
    f(model).backward()
    d = family.head_dim
    for i, layer in enumerate(family.layers()):
        kinds = family.unit_kinds(layer)
        for kind_name, kind in kinds.items():
            want = torch.zeros(kind.n_units, dtype=torch.float64)
            for owned in kind.owns:
                w = family.projection(layer, owned.role).weight
                s = (w * w.grad).abs().double()
                s = s if owned.axis == 0 else s.T
                want += s.reshape(kind.n_units, -1).sum(1)
            got = scores.by_kind[kind_name][i]
            assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6), (i, kind_name)
        assert kinds["kv_group"].owns[0].block == d
    assert [s.numel() for s in scores.by_kind["cross_head"]] == [0, 0, 0, 4, 4, 4]


def test_unit_scores_equal_plain_autograd(name):
    """NIRVANA's max-over-sequence functional of the decoder logits on the family's pairs."""
    model = build_tiny_model(name)
    scores = compute_unit_scores(model, IDS, criterion="nirvana", functional="max_over_seq")
    kwargs, _ = get_family(model).model_inputs(IDS)
    _check_by_hand(model, scores, lambda m: m(**kwargs).logits.amax(dim=1).float().mean())


def test_taylor_scores_are_the_gradient_of_the_seq2seq_loss(name):
    model = build_tiny_model(name)
    scores = compute_unit_scores(model, IDS, criterion="taylor")
    kwargs, labels = get_family(model).model_inputs(IDS, labels=IDS)
    _check_by_hand(model, scores, lambda m: m(**kwargs, labels=labels).loss)


def test_seq2seq_objective_is_the_models_own_loss_on_prefix_continuation_pairs(name):
    model = build_tiny_model(name)
    family = get_family(model)
    kwargs, labels = family.model_inputs(IDS, labels=IDS)
    assert torch.equal(kwargs["input_ids"], IDS[:, :8]) and torch.equal(labels, IDS[:, 8:])
    assert torch.equal(kwargs["decoder_input_ids"][:, 1:], IDS[:, 8:-1])
    assert (kwargs["decoder_input_ids"][:, 0] == model.config.decoder_start_token_id).all()
    with torch.no_grad():
        ours, n = lm_loss(model, {"input_ids": IDS, "labels": IDS})
        theirs = model(**kwargs, labels=labels).loss
    assert n == labels.numel()
    assert torch.allclose(ours, theirs, rtol=1e-5)
    model.config.nirvana_encoder_fraction = 0.25  # the documented option: the encoder reads a quarter
    assert family.model_inputs(IDS)[0]["input_ids"].shape[1] == 4
    model.config.nirvana_encoder_fraction = 1.5
    with pytest.raises(ConfigError, match="nirvana_encoder_fraction=1.5"):
        family.model_inputs(IDS)


def test_export_reloads_bit_identical_in_a_fresh_process(tmp_path):
    refs = {}
    for name in SEQ2SEQ_TINY:
        model = build_tiny_model(name)
        plan = _hand_plan(model)
        cut(model, plan)
        save_pruned(model, None, tmp_path / name, plan)
        refs[name] = _outputs(model)
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["auto_map"] == {"AutoModelForSeq2SeqLM": "modeling_nirvana.NirvanaT5ForConditionalGeneration"}
        assert config["nirvana_layer_widths"]["encoder"]["head_index"] == KEEP_SELF[:3]
    script = f"""
import torch, sys
from transformers import AutoModelForSeq2SeqLM
from nirvana_lightning import load_pruned
from nirvana_lightning.families import get_family
ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
out = {{}}
for name in {SEQ2SEQ_TINY!r}:
    for mode in ("package", "remote"):
        path = {str(tmp_path)!r} + "/" + name
        model = load_pruned(path)[0] if mode == "package" else AutoModelForSeq2SeqLM.from_pretrained(
            path, trust_remote_code=True)
        kwargs, _ = get_family(model).model_inputs(ids)
        with torch.no_grad():
            out[name, mode] = (model(**kwargs).logits, model.generate(input_ids=kwargs["input_ids"][:2],
                               max_new_tokens=6, do_sample=False))
torch.save(out, {str(tmp_path / "out.pt")!r})
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    for name, (logits, tokens) in refs.items():
        for mode in ("package", "remote"):
            assert torch.equal(out[name, mode][0], logits), (name, mode)  # fp32 bitwise
            assert torch.equal(out[name, mode][1], tokens), (name, mode)


def test_load_pruned_refuses_a_plan_that_disagrees_with_the_config(tmp_path):
    model = build_tiny_model("tiny-t5")
    plan = _hand_plan(model)
    cut(model, plan)
    save_pruned(model, None, tmp_path / "e", plan)
    data = json.loads((tmp_path / "e" / "plan.json").read_text())
    data["keep"]["cross_head"][4] = [0, 1]
    (tmp_path / "e" / "plan.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="decoder block 1: plan keeps 2 self-attention heads, 2 cross-attention"):
        load_pruned(tmp_path / "e", verify=False)


def test_plan_round_trips_and_a_cross_attention_unit_in_an_encoder_layer_is_refused():
    plan = make_plan(build_tiny_model("tiny-t5"), IDS, sparsity=0.3, gamma=1.5, round_to=1)
    again = PruningPlan.from_json(plan.to_json())
    assert again.keep == plan.keep and again.fingerprint() == plan.fingerprint()
    assert plan.width_before["cross_head"] == [0, 0, 0, 4, 4, 4] and plan.unit_cost["cross_head"][:3] == [0, 0, 0]
    data = json.loads(plan.to_json())
    data["keep"]["cross_head"][0] = [0]
    with pytest.raises(ValueError, match="plan layer 0: cross_head has no unit before the plan"):
        PruningPlan.from_dict(data)


@pytest.mark.parametrize("sparsity,gamma", [(0.3, 1.0), (0.5, 2.0)])
def test_encoder_and_decoder_units_are_ranked_together_on_the_sparsity_formula(name, sparsity, gamma):
    """One pool of attention heads (encoder self, decoder self, decoder cross: 4 d_kv d_model weights each) and one
    of neurons (both stacks): p_attn = s (A + M) / (A + gamma M) in weights, p_mlp = gamma p_attn."""
    model = build_tiny_model(name)
    plan = make_plan(model, None, sparsity=sparsity, gamma=gamma, round_to=1, criterion="random")
    hidden, d, heads = 64, 16, 4
    n_attn = 6 * heads + 3 * heads  # self-attention of 6 blocks, cross-attention of 3
    n_mlp = 6 * 128
    mlp_cost = (3 if name == "tiny-t5" else 2) * hidden
    a, m = n_attn * 4 * d * hidden, n_mlp * mlp_cost
    p_attn = Fraction(str(sparsity)) * (a + m) / (a + Fraction(str(gamma)) * m)
    removed_attn = sum(plan.width_before[k][i] - len(plan.keep[k][i]) for k in ("kv_group", "cross_head")
                       for i in range(6))
    removed_mlp = sum(w - len(k) for w, k in zip(plan.mlp_dim_before, plan.mlp_keep))
    assert removed_attn == math.floor(n_attn * p_attn)
    assert removed_mlp == math.floor(n_mlp * Fraction(str(gamma)) * p_attn)
    assert abs(plan.realised_sparsity - sparsity) < 0.02
    # ranked together: both stacks and both attention kinds lose units at these targets
    lost = lambda kind, layers: sum(plan.width_before[kind][i] - len(plan.keep[kind][i]) for i in layers)  # noqa: E731
    assert lost("kv_group", range(3)) > 0 and lost("kv_group", range(3, 6)) + lost("cross_head", range(3, 6)) > 0


def test_iterative_steps_compose_into_the_one_shot_cut(name):
    stepwise = build_tiny_model(name)
    first = cut(stepwise, make_plan(stepwise, IDS, sparsity=0.25, gamma=1.5, round_to=1))
    second = cut(stepwise, make_plan(stepwise, IDS, sparsity=0.25, gamma=1.5, round_to=1))
    composed = compose_plans(first, second)
    once = build_tiny_model(name)
    cut(once, composed)
    assert torch.equal(_outputs(once)[0], _outputs(stepwise)[0])
    family = get_family(once)
    assert [a.nirvana_head_index for a in (family.attention_modules(x)["kv_group"] for x in family.layers())] \
        == composed.keep["kv_group"]


def test_kl_selection_runs_and_leaves_the_model_untouched(name):
    from nirvana_lightning import select_calibration

    model = build_tiny_model(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(5)
    candidates = [torch.randint(0, 256, (4, 16), generator=gen) for _ in range(2)]
    probe = torch.randint(0, 256, (2, 16), generator=gen)
    result = select_calibration(model, candidates, probe, sparsity=0.3, gamma=1.5, round_to=1, progress=False)
    assert result.best_index in (0, 1) and all(math.isfinite(k) and k > 0 for k in result.kls)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_query_head_granularity_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="target.attention_granularity='query_head'.*multi-head"):
        make_plan(build_tiny_model("tiny-t5"), IDS, sparsity=0.3, attention_granularity="query_head")


def test_lora_targets_name_modules_of_both_stacks(name):
    model = build_tiny_model(name)
    names = get_family(model).lora_target_modules()
    modules = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert set(names) <= modules
    assert names == (["q", "k", "v", "o", "wi_0", "wi_1", "wo"] if name == "tiny-t5" else ["q", "k", "v", "o", "wi", "wo"])


def test_lm_eval_runs_the_seq2seq_backend_in_memory(smollm2_tokenizer):
    from nirvana_lightning.eval.lm_eval import run_lm_eval

    model = build_tiny_model("tiny-t5", vocab_size=len(smollm2_tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = run_lm_eval(model, smollm2_tokenizer, ["nirvana_brown_cloze"], limit=8, batch_size=8)["nirvana_brown_cloze"]
    assert 0.0 <= metrics["acc"] <= 1.0 and 0.0 <= metrics["acc_norm"] <= 1.0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_debug_config_prunes_recovers_evaluates_and_exports(tmp_path):
    """``python -m nirvana_lightning fit --config configs/debug/tiny_t5.yaml``: plan, report, summary and an export
    that reloads (the LoRA-merged pruned model)."""
    run = subprocess.run([sys.executable, "-m", "nirvana_lightning", "fit", "--config",
                          str(Path(__file__).resolve().parents[1] / "configs/debug/tiny_t5.yaml"), f"--trainer.default_root_dir={tmp_path}"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    log_dir = tmp_path / "lightning_logs" / "version_0"
    for name in ("plan.json", "plan.md", "allocation.json", "summary.json", "summary.md", "export/config.json"):
        assert (log_dir / name).is_file(), name
    plan = PruningPlan.from_json((log_dir / "plan.json").read_text())
    assert plan.provenance["criterion"] == "nirvana" and "cross_head" in plan.keep
    summary = json.loads((log_dir / "summary.json").read_text())
    assert {"validation perplexity", "KL to dense (nats/token)", "params (total)"} <= set(summary["rows"])
    assert any(k.startswith("nirvana_brown_cloze") for k in summary["rows"])
    model, _ = load_pruned(log_dir / "export")
    assert count_parameters(model)["block"] == plan.block_params_after


def test_distillation_reads_the_decoder_outputs_of_the_same_pairs():
    from nirvana_lightning.recovery.objectives import distillation_loss

    teacher = build_tiny_model("tiny-t5")
    student = copy.deepcopy(teacher)
    batch = {"input_ids": IDS, "labels": IDS}
    same = distillation_loss(student, teacher, batch, alpha=0.5)
    assert same["n_token"] == IDS.shape[0] * 8 and abs(float(same["kd"])) < 1e-6
    cut(student, _hand_plan(student))
    pruned = distillation_loss(student, teacher, batch, alpha=0.5)
    assert float(pruned["kd"]) > 0.01
    assert torch.allclose(pruned["lm"], lm_loss(student, batch)[0], rtol=1e-5)


def test_static_cache_generation_and_pickling_of_a_cut_model():
    """Block 0's bias follows the stock key length (a static cache asks for its full length), and a cut model
    pickles (the head-selecting attention class is importable by name)."""
    model = build_tiny_model("tiny-t5")
    plan = _hand_plan(model)
    kwargs, _ = get_family(model).model_inputs(IDS)
    generate = lambda m, **kw: m.generate(input_ids=kwargs["input_ids"][:2], max_new_tokens=6,  # noqa: E731
                                          do_sample=False, **kw)
    with torch.no_grad(), masked_units(model, plan):
        want = generate(model)
    cut(model, plan)
    with torch.no_grad():
        assert torch.equal(generate(model, cache_implementation="static"), want)
    import pickle

    again = pickle.loads(pickle.dumps(model))  # what a spawned process or copy.deepcopy-by-pickle needs
    assert torch.equal(_outputs(again)[0], _outputs(model)[0])


def test_instruction_data_is_refused_before_any_work(tmp_path):
    """SFT examples (prompt masked with -100) have no place in fixed-fraction pairs: the CLI refuses them before the
    model loads, the family whenever such labels reach it."""
    model = build_tiny_model("tiny-t5")
    labels = IDS.clone()
    labels[:, :10] = -100
    with pytest.raises(ConfigError, match="data.task='sft'"):
        lm_loss(model, {"input_ids": IDS, "labels": labels})
    run = subprocess.run([sys.executable, "-m", "nirvana_lightning", "fit", "--config",
                          str(Path(__file__).resolve().parents[1] / "configs/debug/tiny_t5.yaml"), "--data.task=sft",
                          f"--trainer.default_root_dir={tmp_path}"], capture_output=True, text=True, timeout=900)
    assert run.returncode != 0
    assert "data.task='sft'" in run.stderr.strip().splitlines()[-1], run.stderr[-2000:]
    assert not list(tmp_path.rglob("plan.json"))
