"""Typed settings (validated once, declared once), the schedule's pure arithmetic, the declared contract,
0.1 compatibility of the Python API and of the YAML keys, and the CLI's last-line errors."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model

from nirvana_lightning import (
    Calibration,
    ConfigError,
    NirvanaDataModule,
    NirvanaModule,
    NirvanaPruningCallback,
    PruningTarget,
    Schedule,
    Scoring,
    Selection,
    make_plan,
    plan_from_scores,
    prune,
    select_calibration,
)
from nirvana_lightning.pruning.schedule import cumulative_sparsity, reachable_steps, step_target
from nirvana_lightning.pruning.settings import FLAT_KEYWORDS, RENAMED_KEYS, SECTIONS, check_combination

REPO = Path(__file__).resolve().parent.parent

BAD = [
    (lambda: PruningTarget(sparsity=1.0), r"^target\.sparsity=1\.0 .*\[0, 1\)"),
    (lambda: PruningTarget(sparsity=float("nan")), r"^target\.sparsity=nan"),
    (lambda: PruningTarget(sparsity=0.2, param_budget=10), r"^target\.sparsity=0\.2 .*exactly one"),
    (lambda: PruningTarget(sparsity=None), r"^target\.sparsity=None .*exactly one"),
    (lambda: PruningTarget(gamma=0), r"^target\.gamma=0 "),
    (lambda: PruningTarget(gamma="best"), r"^target\.gamma='best' .*'auto'"),
    (lambda: PruningTarget(gamma_grid=[]), r"^target\.gamma_grid=\[\]"),
    (lambda: PruningTarget(round_to=3), r"^target\.round_to=3 .*1, 8, 16"),
    (lambda: PruningTarget(tp_size=0), r"^target\.tp_size=0 .*positive integer"),
    (lambda: PruningTarget(skip_layers=[-1]), r"^target\.skip_layers\[0\]=-1"),
    (lambda: PruningTarget(allocation="local"), r"^target\.allocation='local' .*'global', 'uniform'"),
    (lambda: Scoring(criterion="obs"), r"^scoring\.criterion='obs' .*'nirvana'"),
    (lambda: Scoring(functional="min"), r"^scoring\.functional='min'"),
    (lambda: Scoring(dtype="fp8"), r"^scoring\.dtype='fp8' .*'float32', 'model'"),
    (lambda: Scoring(micro_batch_size=0), r"^scoring\.micro_batch_size=0"),
    (lambda: Scoring(accumulate="mean"), r"^scoring\.accumulate='mean'"),
    (lambda: Scoring(device="gpu9x"), r"^scoring\.device='gpu9x' .*\+N"),
    (lambda: Calibration(samples=0), r"^calibration\.samples=0 .*positive integer"),
    (lambda: Calibration(seq_len=2.5), r"^calibration\.seq_len=2\.5"),
    (lambda: Calibration(seed=-1), r"^calibration\.seed=-1"),
    (lambda: Selection(method="entropy"), r"^selection\.method='entropy' .*'none', 'kl'"),
    (lambda: Selection(num_candidates=0), r"^selection\.num_candidates=0"),
    (lambda: Selection(candidate_mode="best"), r"^selection\.candidate_mode='best'"),
    (lambda: Schedule(kind="exponential"), r"^schedule\.kind='exponential'"),
    (lambda: Schedule(n_steps=3), r"^schedule\.kind='once' .*iterative"),
    (lambda: Schedule(kind="linear", n_steps=2), r"^schedule\.at_epochs=None .*exactly one"),
    (lambda: Schedule(kind="linear", n_steps=2, at_epochs=[2, 1]), r"^schedule\.at_epochs=\[2, 1\]"),
    (lambda: Schedule(kind="linear", n_steps=2, every_n_steps=0), r"^schedule\.every_n_steps=0"),
]


@pytest.mark.parametrize("make, pattern", BAD, ids=[p for _, p in BAD])
def test_each_setting_validates_itself_naming_its_key(make, pattern):
    with pytest.raises(ConfigError, match=pattern):
        make()


def test_cross_setting_rules_and_the_callback_prefix():
    iterative = Schedule(kind="linear", n_steps=2, every_n_steps=2)
    with pytest.raises(ConfigError, match=r"^target\.gamma='auto'"):
        check_combination(PruningTarget(gamma="auto"), Scoring(), Selection(), iterative)
    with pytest.raises(ConfigError, match=r"^NirvanaPruningCallback\.schedule\.kind='linear'"):
        NirvanaPruningCallback(target=PruningTarget(sparsity=None, param_budget=10), schedule=iterative)
    with pytest.raises(ConfigError, match=r"^NirvanaPruningCallback\.selection\.method='kl' .*'magnitude'"):
        NirvanaPruningCallback(scoring=Scoring(criterion="magnitude"), selection=Selection(method="kl"))
    with pytest.raises(ConfigError, match=r"^NirvanaPruningCallback\.bias_compensation=True"):
        NirvanaPruningCallback(schedule=iterative, bias_compensation=True)
    with pytest.raises(ConfigError, match=r"^NirvanaPruningCallback\.target='0\.3' .*PruningTarget"):
        NirvanaPruningCallback(target="0.3")


def test_settings_accept_what_users_write():
    """Types normalised at the edge (issue 25): a mapping for a settings object, the bare value of its one obvious
    field, an int for a one-element list; the Python API and the callback read them alike."""
    cb = NirvanaPruningCallback(target={"sparsity": 0.3, "gamma": 2.0}, scoring="taylor", selection="none",
                                schedule={"kind": "once"})
    assert cb.target == PruningTarget(sparsity=0.3, gamma=2.0) and cb.scoring == Scoring(criterion="taylor")
    assert NirvanaPruningCallback(target=0.3).target == PruningTarget(sparsity=0.3)
    assert PruningTarget(sparsity=0.2, skip_layers=0).skip_layers == (0,)  # layer 0, not "skip nothing"
    assert PruningTarget(sparsity=0.2, gamma="auto", gamma_grid=2).gamma_grid == (2.0,)
    from nirvana_lightning.pruning.settings import from_flat

    target, scoring = from_flat({"sparsity": 0.4}, "magnitude", {}, "prune")
    assert target == PruningTarget(sparsity=0.4) and scoring == Scoring(criterion="magnitude")


def test_settings_normalise_and_are_immutable():
    t = PruningTarget(skip_layers=[3, 1], gamma_grid=[1, 2])
    assert t.skip_layers == (3, 1) and t.gamma_grid == (1.0, 2.0)
    assert PruningTarget().grid == (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.sparsity = 0.5


def test_every_setting_is_declared_once():
    """No field of the typed settings is also a parameter of the callback, the data module or the module,
    and no two sections share a field name except the seeds of different draws."""
    owners = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            owners.setdefault(f.name, []).append(section)
    shared = {name: where for name, where in owners.items() if len(where) > 1}
    assert shared == {"seed": ["scoring", "calibration"]}, shared  # random-criterion seed vs calibration draw
    for cls in (NirvanaPruningCallback, NirvanaDataModule, NirvanaModule):
        params = set(inspect.signature(cls.__init__).parameters)
        old = {k.split(".", 1)[1] for k in RENAMED_KEYS if k.split(".", 1)[0] in (cls.__name__, "data")}
        assert not params & (old - set(SECTIONS)), (cls.__name__, params & old)  # 0.1's `schedule:` is a section now
    assert set(inspect.signature(NirvanaPruningCallback.__init__).parameters) - {"self"} == {
        *SECTIONS, "plan_path", "bias_compensation"}


def test_01_keywords_of_the_python_api_still_work():
    """prune / make_plan / select_calibration / plan_from_scores with 0.1's flat keywords give the plan the
    typed objects give (same kept units), and an unknown keyword names the valid ones."""
    cal = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    probe = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    flat = dict(sparsity=0.3, gamma=2.0, criterion="taylor", round_to=8, scoring_dtype="float32", seed=0)
    typed = (PruningTarget(sparsity=0.3, gamma=2.0, round_to=8), Scoring(criterion="taylor"))
    model = build_tiny_model("tiny-llama")
    a, b = make_plan(model, cal, **flat), make_plan(model, cal, *typed)
    assert a.fingerprint() == b.fingerprint() and a.provenance["criterion"] == "taylor"
    # a keyword overrides the same field of an object also passed
    assert make_plan(model, cal, *typed, sparsity=0.5).provenance["sparsity"] == 0.5
    result = select_calibration(model, [cal, cal.flip(0)], probe, sparsity=0.3, gamma=2.0, criterion="taylor",
                                progress=False)
    assert result.plan.fingerprint() == a.fingerprint()
    from nirvana_lightning.pruning.gradients import compute_unit_scores

    scores = compute_unit_scores(model, [cal], criterion="taylor")
    assert plan_from_scores(model, scores, sparsity=0.3, gamma=2.0, round_to=8).fingerprint() == a.fingerprint()
    pruned = build_tiny_model("tiny-llama")
    assert prune(pruned, cal, **flat).fingerprint() == a.fingerprint()
    with pytest.raises(ConfigError, match=r"^make_plan\(sparsty=\.\.\.\)=0\.3 .*sparsity"):
        make_plan(model, cal, sparsty=0.3)
    with pytest.raises(ConfigError, match=r"^target\.sparsity=None .*exactly one .* for prune .*nothing is pruned by default"):
        prune(model, cal, criterion="taylor")  # 0.1 refused a call without a target too
    # "+0" (each rank's own accelerator in the callback) is the model's own device here: offloaded scoring
    assert make_plan(model, cal, *typed, scoring_device="+0").fingerprint() == a.fingerprint()
    assert set(FLAT_KEYWORDS) >= set(flat)


# ----------------------------------------------------------------- schedule
def test_schedule_due_is_pure_and_matches_the_curve():
    every = Schedule(kind="linear", n_steps=3, every_n_steps=4)
    fired = [step for step in range(0, 20) if every.due(epoch=0, step=step, done=1 + (step >= 8), epoch_start=False)]
    assert fired[:2] == [4, 5] and 8 in fired  # step 2 due from step 4 on, step 3 from step 8 (done=2)
    assert not every.due(epoch=0, step=100, done=3, epoch_start=False)  # finished
    assert not every.due(epoch=0, step=4, done=1, epoch_start=True)  # every_n_steps fires after batches only
    epochs = Schedule(kind="cubic", n_steps=2, at_epochs=[1, 3])
    assert not epochs.prunes_at_setup and every.prunes_at_setup and Schedule().prunes_at_setup
    assert [e for e in range(5) if epochs.due(epoch=e, step=0, done=0, epoch_start=True)] == [1]
    assert [e for e in range(5) if epochs.due(epoch=e, step=0, done=1, epoch_start=True)] == [3]
    assert not Schedule().due(epoch=0, step=10, done=0, epoch_start=False)
    assert reachable_steps(None, 4, 3, max_steps=8, max_epochs=None) == (2, "trainer.max_steps", 8)
    assert reachable_steps(None, 4, 3, max_steps=9, max_epochs=None) is None
    assert reachable_steps((0, 2, 5), None, 3, max_steps=-1, max_epochs=5) == (2, "trainer.max_epochs", 5)


def test_step_targets_land_on_the_one_shot_counts():
    """Counted from the dense widths, the steps' removals add up to the one-shot counts at the final target."""
    from nirvana_lightning.pruning.allocation import removal_counts

    dense = [(4, 64)] * 3
    kw = dict(gamma=2.0, n_query_per_kv=2, head_dim=16, skip_layers=(), allocation="global")
    total = [0, 0]
    now = list(dense)
    block = dense_block = sum(4 * (2 + 2) * 16 * 64 + 3 * 64 * 64 for _ in dense)
    for k in (1, 2, 3):
        t = step_target("cubic", 0.5, k, 3, dense_widths=dense, current_widths=now, dense_block=dense_block,
                        current_block=block, **kw)
        assert t.cumulative == pytest.approx(cumulative_sparsity("cubic", 0.5, k, 3))
        total = [total[0] + t.counts[0], total[1] + t.counts[1]]
        per = [(t.counts[0] + len(now) - 1) // len(now), (t.counts[1] + len(now) - 1) // len(now)]
        now = [(a - min(per[0], t.counts[0] - i * per[0]) if t.counts[0] > i * per[0] else a,
                m - min(per[1], max(0, t.counts[1] - i * per[1]))) for i, (a, m) in enumerate(now)]
        block = sum(a * (2 + 2) * 16 * 64 + 3 * m * 64 for a, m in now)
    want = removal_counts([4] * 3, [64] * 3, sparsity=0.5, gamma=2.0, n_query_per_kv=2, head_dim=16, skip_layers=())
    assert tuple(total) == tuple(want)
    uniform = step_target("linear", 0.5, 1, 2, dense_widths=dense, current_widths=dense, dense_block=dense_block,
                          current_block=dense_block, **{**kw, "allocation": "uniform"})
    assert uniform.counts is None and uniform.sparsity == pytest.approx(0.25)


# ----------------------------------------------------------------- contract
def test_the_module_contract_is_declared_and_checked():
    import lightning as L

    from nirvana_lightning import (
        PruneListener,
        PruningReportCallback,
        SummarySource,
    )
    from nirvana_lightning.contract import prunable

    module = NirvanaModule(source="tiny-llama")
    assert prunable(module) is module  # checked without building the model
    with pytest.raises(ConfigError, match=r"^model='LightningModule' .*PrunableModule.*missing: .*build_model"):
        prunable(L.LightningModule())
    assert isinstance(PruningReportCallback(plot=False), PruneListener)
    assert not isinstance(NirvanaPruningCallback(), SummarySource)
    module.resume_from("x.ckpt")
    assert module.resume_ckpt_path == "x.ckpt"


def test_private_lightning_calls_are_checked_in_one_place():
    """Fails loudly (here, in CI) when Lightning or torch drop a private name the iterative rebuild uses."""
    from nirvana_lightning.recovery.rebuild import PRIVATE_API, check_private_api

    check_private_api()
    assert PRIVATE_API and all(names for names in PRIVATE_API.values())


# ---------------------------------------------------------------- docs
def test_configs_md_is_generated_from_the_declarations():
    from nirvana_lightning.configs_doc import configs_markdown, path

    assert path().read_text(encoding="utf-8") == configs_markdown(), \
        "docs/configs.md is stale: run python -m nirvana_lightning.configs_doc"
    text = configs_markdown()
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            row = next(line for line in text.splitlines() if line.startswith(f"| `{section}.{f.name}` |"))
            assert not row.endswith("|  |"), f"{section}.{f.name} has no description"


def test_no_file_outside_the_repository_is_cited():
    files = [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "nirvana_lightning").rglob("*.py")]
    offenders = [str(f.relative_to(REPO)) for f in files if "METHOD.md" in f.read_text(encoding="utf-8")
                 or "../shared" in f.read_text(encoding="utf-8")]
    assert not offenders, offenders
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 150


# ------------------------------------------------------------------- CLI
def _cli_last_line(args: list[str], capsys) -> str:
    from nirvana_lightning.cli import entry

    with pytest.raises(SystemExit) as info:
        entry(args)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error output"
    return err[-1]


CB = "--trainer.callbacks.init_args."
BAD_CLI = [
    ([CB + "target.sparsity=1.5"], r"NirvanaPruningCallback\.target\.sparsity=1\.5 is invalid; expected a fraction"),
    ([CB + "target.gamma=-2"], r"NirvanaPruningCallback\.target\.gamma=-2\.0 is invalid; expected a finite number"),
    ([CB + "target.round_to=3"], r"NirvanaPruningCallback\.target\.round_to=3 is invalid; expected one of: 1, 8"),
    ([CB + "calibration.seq_len=0"], r"NirvanaPruningCallback\.calibration\.seq_len=0 is invalid; expected a positive"),
    ([CB + "scoring.criterion=obs"], r"NirvanaPruningCallback\.scoring\.criterion='obs' is invalid; expected one of: "
                                     r"'nirvana', 'magnitude', 'taylor', 'random', 'wanda_sp', 'flap'"),
    (["--model.lrr=1"], r"model\.lrr is not a setting"),
    ([CB + "target.sparsty=0.1"], r"NirvanaPruningCallback\.target\.sparsty is not a setting \(did you mean "
                                  r"NirvanaPruningCallback\.target\.sparsity\?\)"),
    ([CB + "target.sparsity=abc"], r"NirvanaPruningCallback\.target\.sparsity='abc' is invalid; expected float or null"),
    ([CB + "sparsity=0.3"], r"NirvanaPruningCallback\.sparsity is not a setting since 0\.2; use "
                            r"NirvanaPruningCallback\.target\.sparsity"),
    (["--model.recovery=qlora"], r"model\.recovery='qlora' is invalid; expected one of: 'lora', 'full', 'none'"),
    (["--data.calibration_samples=8"], r"data\.calibration_samples is not a setting since 0\.2; use "
                                       r"NirvanaPruningCallback\.calibration\.samples"),
    ([CB + "selection.method=entropy"], r"NirvanaPruningCallback\.selection\.method='entropy' is invalid"),
    (["--model.lr=-1"], r"model\.lr=-1\.0 is invalid; expected a finite number > 0"),
    ([CB + "schedule=linear"], r"NirvanaPruningCallback\.schedule is not a setting since 0\.2; use "
                               r"NirvanaPruningCallback\.schedule\.kind"),
    # found only once the model's widths are known (at setup): still named as the user wrote it
    ([CB + "target.sparsity=0.6", CB + "target.round_to=128"],
     r"NirvanaPruningCallback\.target\.round_to=128 is invalid; .*narrowest has"),
]


@pytest.mark.parametrize("args, pattern", BAD_CLI, ids=[a[0] for a, _ in BAD_CLI])
def test_a_bad_cli_value_ends_with_our_one_line(args, pattern, capsys, tmp_path):
    import re

    last = _cli_last_line(["fit", "--config", str(REPO / "configs" / "debug" / "tiny.yaml"),
                           f"--trainer.default_root_dir={tmp_path}", *args], capsys)
    assert last.startswith("nirvana-lightning: error: ") and re.search(pattern, last), last
    assert not any(tmp_path.rglob("plan.json")), "work started before the error"


OLD_CONFIGS = sorted((REPO / "tests" / "data" / "configs_0.1").glob("*.yaml"))


def test_every_01_config_has_a_converted_copy():
    names = {p.name for p in OLD_CONFIGS}
    current = {str(p.relative_to(REPO / "configs")).replace("/", "_") for p in (REPO / "configs").rglob("*.yaml")}
    assert len(names) == 11 and names <= current  # configs added since 0.2 have no 0.1 form


@pytest.mark.parametrize("old", OLD_CONFIGS, ids=[p.name for p in OLD_CONFIGS])
def test_01_configs_fail_naming_the_new_key(old, capsys):
    """The chosen migration: a 0.1 key fails, naming its new key (no silent translation)."""
    last = _cli_last_line(["fit", "--config", str(old), "--print_config"], capsys)
    assert "is not a setting since 0.2; use " in last and str(old) in last, last
    key = last.split("nirvana-lightning: error: ", 1)[1].split(" ", 1)[0]
    assert key in RENAMED_KEYS and RENAMED_KEYS[key].split(" ")[0] in last


def test_calibration_source_is_a_calibration_setting(tmp_path):
    """Where calibration text comes from is declared with the other calibration settings, and read lazily."""
    text = tmp_path / "calibration.txt"
    text.write_text("the zebra runs across the savanna at dawn. " * 60)
    with pytest.raises(ConfigError, match=r"^calibration\.source\[0\]='/no/such\.txt'"):
        Calibration(source=["/no/such.txt"])
    assert Calibration(source=str(text)).source == (str(text),)
    dm = NirvanaDataModule(tokenizer="tiny-llama", seq_len=32)
    windows = dm.calibration_windows(4, 16, 0, sources=Calibration(source=[str(text)]).source)
    allowed = set(dm.tokenizer(text.read_text(), add_special_tokens=False)["input_ids"]) | {dm.tokenizer.eos_token_id}
    assert windows.shape == (4, 16) and set(windows.flatten().tolist()) <= allowed
    train_side = dm.calibration_windows(4, 16, 0)
    assert not torch.equal(train_side, windows)
