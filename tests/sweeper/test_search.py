"""Per-cell search: the searcher (Optuna per cell, confirmation), the scheduler (ASHA per
cell), fault injection, and a whole tiny sweep on gmm through `caat-sweep launch`."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
from sweep_support import tiny_space, write_space

from sweeper.cli import main
from sweeper.contract import CLASSWISE_KEYS
from sweeper.search import (
    SWEEP_KEY,
    CellScheduler,
    CellSearcher,
    FailRule,
    SearchState,
    load_search_state,
    parse_fault_rules,
    study_trials,
)
from sweeper.spaces import parse_space
from sweeper.storage import check_shared
from sweeper.tracking import Tracker
from trainables.config import flatten, validate
from trainables.errors import ConfigError
from trainables.metric_names import AUTOATTACK_CLASSWISE, best_name

# What a trial without AutoAttack (`eval.autoattack: none`) puts in classwise.json.
WITHOUT_AUTOATTACK = [k for k in CLASSWISE_KEYS if k not in AUTOATTACK_CLASSWISE
                      and k not in map(best_name, AUTOATTACK_CLASSWISE)]
CELL_ERM, CELL_TRADES = "pair-0.2_ir-1_eps-0.1/erm", "pair-0.2_ir-1_eps-0.1/trades"
METRIC_NAMES = {"train_loss", "train_samples_per_s"} | {
    f"{split}_{m}" for split in ("val", "test")
    for m in ("natural_acc", "robust_acc", "worst_class_natural_acc", "worst_class_robust_acc",
              "class_natural_acc_std", "boundary_error")}
# A completed trial's last step adds its best checkpoint (`eval.keep_best`); a pruned one,
# stopped before its last epoch, has none.
BEST_NAMES = {"best_epoch"} | {best_name(m) for m in METRIC_NAMES if m.startswith("test_")}


# ---------------------------------------------------------------------- the searcher


def _result(epoch: int, value: float | None) -> dict:
    out = {"epoch": epoch, "training_iteration": epoch, "train_loss": 1.0}
    if value is not None:
        out["val_robust_acc"] = value
    return out


def _url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'optuna.db'}"


def _states(url: str) -> dict[str, list[str]]:
    """Cell id -> the states of its study's trials, read back from the storage."""
    import optuna

    return {s.study_name: [t.state.name for t in optuna.load_study(
        study_name=s.study_name, storage=url).trials]
        for s in optuna.get_all_study_summaries(url)}


def test_searcher_hands_out_cells_round_robin_then_confirms_the_best(tmp_path):
    plan = parse_space(tiny_space(confirm={"seeds": [1, 2]}))
    searcher = CellSearcher(plan, _url(tmp_path), CellScheduler(plan))
    configs = {t: searcher.suggest(t) for t in ("t1", "t2", "t3", "t4")}
    assert [c[SWEEP_KEY]["cell"] for c in configs.values()] == [CELL_ERM, CELL_TRADES] * 2
    assert all(c[SWEEP_KEY]["phase"] == "tune" and c[SWEEP_KEY]["seed"] == 0
               for c in configs.values())
    validate({k: v for k, v in configs["t2"].items() if k != SWEEP_KEY})  # a whole trial config
    assert searcher.suggest("t5") is None  # nothing to confirm until a cell's tuning ends

    searcher.on_trial_result("t1", _result(1, 0.5))
    searcher.on_trial_complete("t1", _result(3, 0.8))  # completed
    searcher.on_trial_complete("t3", _result(1, 0.2))  # stopped by ASHA at epoch 1
    confirm = searcher.suggest("c1")
    assert confirm[SWEEP_KEY] | {"data": None, "warm_start": None} == {
        "cell": CELL_ERM, "scenario": "pair-0.2_ir-1_eps-0.1", "method": "erm",
        "phase": "confirm", "seed": 1, "epochs": 3, "data": None, "warm_start": None,
        "tuned_by": "t1"}
    assert confirm["optim"]["lr"] == configs["t1"]["optim"]["lr"]
    assert searcher.suggest("c2")[SWEEP_KEY]["seed"] == 2

    searcher.on_trial_complete("t2", None, error=True)
    searcher.on_trial_complete("t4", _result(3, 0.6))
    assert {searcher.suggest(t)[SWEEP_KEY]["cell"] for t in ("c3", "c4")} == {CELL_TRADES}
    assert searcher.suggest("c5") == CellSearcher.FINISHED
    assert not searcher.complete()
    for t in ("c1", "c2", "c3", "c4"):
        searcher.on_trial_complete(t, _result(3, 0.7))
    assert searcher.complete()

    searcher.flush()
    assert _states(_url(tmp_path)) == {CELL_ERM: ["COMPLETE", "PRUNED"],
                                       CELL_TRADES: ["FAIL", "COMPLETE"]}
    import optuna

    erm = optuna.load_study(study_name=CELL_ERM, storage=_url(tmp_path)).trials
    # The result ASHA stopped on (seen only by on_trial_complete) is the last step.
    assert erm[0].intermediate_values == {1: 0.5, 3: 0.8}
    assert erm[1].intermediate_values == {1: 0.2} and erm[1].value == 0.2


def test_verdicts_reach_the_study_one_save_late_and_a_lost_trial_is_adopted(tmp_path):
    """A driver killed at any point leaves no finished study trial that the restored
    searcher does not own, and one trial asked for after the last save is adopted."""
    from sweeper.search import study_trials

    url = _url(tmp_path)
    plan = parse_space(tiny_space())
    searcher = CellSearcher(plan, url, CellScheduler(plan))
    first = searcher.suggest("t1")  # erm
    searcher.on_trial_complete("t1", _result(3, 0.9))
    assert _states(url)[CELL_ERM] == ["RUNNING"]  # not before a save holds the verdict
    searcher.save(str(tmp_path / "s1"))
    assert _states(url)[CELL_ERM] == ["RUNNING"]  # s1 may not be renamed into place yet
    searcher.suggest("t2")  # trades
    lost = searcher.suggest("t3")  # erm, asked for after the last save ...
    searcher.on_trial_complete("t3", _result(3, 0.1))  # ... and finished: then SIGKILL
    searcher.save(str(tmp_path / "s2"))  # (a save Ray never renamed into place)
    assert _states(url)[CELL_ERM] == ["COMPLETE", "RUNNING"]

    restored = CellSearcher(plan, url, CellScheduler(plan))
    restored.restore(str(tmp_path / "s1"))
    again = restored.suggest("t2b")  # trades: t2 was unknown to s1 too
    adopted = restored.suggest("t3b")  # erm: takes over the study's trial 1, its params too
    assert adopted["optim"]["lr"] == lost["optim"]["lr"] != first["optim"]["lr"]
    assert again[SWEEP_KEY]["cell"] == CELL_TRADES
    for t, value in (("t2b", 0.5), ("t3b", 0.2)):
        restored.on_trial_complete(t, _result(3, value))
    restored.flush()
    (tmp_path / "runs").mkdir()
    (tmp_path / "sweep.json").write_text(json.dumps({"optuna_storage": url}))
    studies = study_trials(str(tmp_path))
    assert {c: sorted(ts) for c, ts in studies.items()} == {CELL_ERM: ["t1", "t3b"],
                                                             CELL_TRADES: ["t2b"]}
    assert studies[CELL_ERM]["t3b"].values == [0.2]


def test_searcher_skips_confirmation_of_a_cell_without_completed_trials(tmp_path):
    space = tiny_space(methods=["erm"])
    del space["search"]["trades"]
    plan = parse_space(space)
    searcher = CellSearcher(plan, _url(tmp_path))
    for t in ("t1", "t2"):
        searcher.suggest(t)
        searcher.on_trial_complete(t, None, error=True)
    assert searcher.suggest("t3") == CellSearcher.FINISHED
    assert searcher.complete() and searcher.confirm_skipped() == [CELL_ERM]


def test_searcher_state_round_trips_with_studies_and_asha_rungs(tmp_path):
    plan = parse_space(tiny_space())
    scheduler = CellScheduler(plan)
    searcher = CellSearcher(plan, _url(tmp_path), scheduler)
    trials = {t: _trial(t, searcher.suggest(t)) for t in ("t1", "t2", "t3")}
    for t in trials.values():
        scheduler.on_trial_add(None, t)
    scheduler.on_trial_result(None, trials["t1"], _result(1, 0.4))
    searcher.on_trial_complete("t1", _result(3, 0.9))
    searcher.save(str(tmp_path / "state.pkl"))

    scheduler2 = CellScheduler(plan)
    restored = CellSearcher(plan, _url(tmp_path), scheduler2)
    restored.restore(str(tmp_path / "state.pkl"))
    assert _states(_url(tmp_path))[CELL_ERM] == ["COMPLETE", "RUNNING"]
    # The ASHA rungs came back: t3 (ERM) below t1's 0.4 at epoch 1 stops, as it would have
    # in the original; a scheduler that knows nothing of t1 lets it go on.
    fresh = CellScheduler(plan)
    fresh.on_trial_add(None, trials["t3"])
    assert fresh.on_trial_result(None, trials["t3"], _result(1, 0.1)) == fresh.CONTINUE
    for s in (scheduler, scheduler2):
        assert s.on_trial_result(None, trials["t3"], _result(1, 0.1)) == s.STOP
    # It goes on where it stopped: t4 is the last tuning trial (trades), then waits.
    assert restored.suggest("t4")[SWEEP_KEY]["cell"] == CELL_TRADES
    assert restored.suggest("t5") is None


def test_searcher_state_refuses_another_sweeps_or_an_older_format(tmp_path):
    plan = parse_space(tiny_space())
    searcher = CellSearcher(plan, _url(tmp_path), CellScheduler(plan))
    searcher.suggest("t1")
    searcher.save(str(tmp_path / "state.pkl"))
    other = parse_space(tiny_space(methods=["erm"]) | {"search": {}})
    with pytest.raises(ConfigError, match=r"state.pkl: the search state's cells do not match "
                                          r"the sweep's \(not in the sweep: .*/trades\)"):
        CellSearcher(other).restore(str(tmp_path / "state.pkl"))
    state = SearchState.from_disk(str(tmp_path / "state.pkl"))
    state.version = 99
    state.to_disk(str(tmp_path / "future.pkl"))
    with pytest.raises(ConfigError, match="future.pkl: search state format version 99; this "
                                          "caat-sweeper reads version 2"):
        CellSearcher(plan).restore(str(tmp_path / "future.pkl"))
    (tmp_path / "old.pkl").write_bytes(pickle.dumps({"trials": {}, "subs": {}, "scheduler": None}))
    with pytest.raises(ConfigError, match="old.pkl: this sweep was saved by an older "
                                          "caat-sweeper; finish it with that version or start "
                                          "a new sweep"):
        CellSearcher(plan).restore(str(tmp_path / "old.pkl"))


# ---------------------------------------------------------------------- the scheduler


def _trial(trial_id: str, config: dict) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config=config)


def _meta(cell: str, phase: str = "tune") -> dict:
    return {SWEEP_KEY: {"cell": cell, "phase": phase}}


def test_asha_compares_trials_only_within_their_cell():
    plan = parse_space(tiny_space())
    scheduler = CellScheduler(plan)
    a1 = _trial("a1", _meta(CELL_ERM))
    b1, b2 = _trial("b1", _meta(CELL_TRADES)), _trial("b2", _meta(CELL_TRADES))
    c1 = _trial("c1", _meta(CELL_TRADES, "confirm"))
    for t in (a1, b1, b2, c1):
        scheduler.on_trial_add(None, t)
    go, stop = scheduler.CONTINUE, scheduler.STOP
    assert scheduler.on_trial_result(None, a1, _result(1, 0.9)) == go
    # A shared ASHA would stop b1 (0.1 is below a1's 0.9); its own cell has no rival yet.
    assert scheduler.on_trial_result(None, b1, _result(1, 0.1)) == go
    assert scheduler.on_trial_result(None, b2, _result(1, 0.05)) == stop
    # Confirmation trials run their full budget; epochs without evaluation pass through.
    assert scheduler.on_trial_result(None, c1, _result(1, 0.0)) == go
    assert scheduler.on_trial_result(None, b1, _result(2, None)) == go


def test_asha_can_be_switched_off():
    plan = parse_space(tiny_space(asha={"enabled": False}))
    scheduler = CellScheduler(plan)
    trials = [_trial(t, _meta(CELL_ERM)) for t in ("a", "b")]
    for t in trials:
        scheduler.on_trial_add(None, t)
    assert scheduler.on_trial_result(None, trials[0], _result(1, 0.9)) == scheduler.CONTINUE
    assert scheduler.on_trial_result(None, trials[1], _result(1, 0.0)) == scheduler.CONTINUE


# ------------------------------------------------------------------ small pieces


def test_fault_rules_parse():
    assert parse_fault_rules("2:/erm;3:/trades:always") == [
        FailRule(2, "/erm", False), FailRule(3, "/trades", True)]
    assert parse_fault_rules("") == [] and parse_fault_rules("4") == [FailRule(4, "", False)]
    with pytest.raises(ConfigError, match="expected EPOCH"):
        parse_fault_rules("x:/erm")


def test_local_storage_unseen_by_a_node_is_rejected_before_launch(tmp_path):
    storage = tmp_path / "runs"
    with pytest.raises(ConfigError, match=r"--storage: .* is a local path that 1 node\(s\) "
                                          r"of this Ray cluster cannot see \(10\.0\.0\.7\)"):
        check_shared(str(storage), unseen_by=lambda marker: ["10.0.0.7"])
    assert not storage.exists()  # the probe file and the directory it made are gone
    check_shared(str(storage), unseen_by=lambda marker: [])
    check_shared("s3://bucket/sweeps", unseen_by=lambda marker: pytest.fail("probed a URI"))


# -------------------------------------------------------------- a whole tiny sweep


@pytest.fixture(scope="module")
def tiny_sweep(ray_local, tmp_path_factory):
    """One launch, shared by the assertions below: 2 cells x 3 tuning trials, then the
    best of each cell with 2 seeds; a 1-epoch ERM warm start per scenario and seed."""
    root = tmp_path_factory.mktemp("tiny")
    space = tiny_space(trials_per_cell=3, confirm={"seeds": [1, 2]})
    space["base"]["init"] = {"erm_epochs": 1}
    path = write_space(root / "tiny.yaml", space)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    rc = main(["launch", str(path), "--storage", str(root / "runs"), "--tracking-uri", uri,
               "--quiet"])
    tracker = Tracker(uri, "tiny")
    return SimpleNamespace(rc=rc, root=root, uri=uri, tracker=tracker,
                           runs=tracker.trial_runs(), sweep_dir=root / "runs" / "tiny")


def _ray_trials(sweep_dir: Path) -> dict[str, str]:
    from ray.tune import ExperimentAnalysis

    return {t.trial_id: t.status for t in ExperimentAnalysis(str(sweep_dir)).trials}


def test_sweep_runs_to_completion_with_one_run_per_trial(tiny_sweep):
    assert tiny_sweep.rc == 0
    trials = _ray_trials(tiny_sweep.sweep_dir)
    assert len(trials) == 2 * 3 + 2 * 2 and set(trials.values()) == {"TERMINATED"}
    ids = [r.data.tags["trial_id"] for r in tiny_sweep.runs]
    assert sorted(ids) == sorted(trials) and len(set(ids)) == len(ids)
    assert json.loads((tiny_sweep.sweep_dir / "sweep.json").read_text())["state"] == "done"


def test_parent_and_child_runs_carry_the_schema_tags(tiny_sweep):
    client = tiny_sweep.tracker.client
    exp = client.get_experiment_by_name("caat-sweep/tiny")
    parents = client.search_runs([exp.experiment_id], "tags.role = 'parent'")
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.run_name == "tiny" and parent.info.status == "FINISHED"
    assert {k: parent.data.tags[k] for k in ("sweep", "role", "metric", "mode")} == {
        "sweep": "tiny", "role": "parent", "metric": "val_robust_acc", "mode": "max"}
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["space.yaml"]
    for run in tiny_sweep.runs:
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.run_name == tags["trial_id"]
        assert tags["sweep"] == "tiny" and tags["role"] == "trial"
        assert tags["cell"] in (CELL_ERM, CELL_TRADES)
        assert tags["cell"] == f"{tags['scenario']}/{tags['method']}"
        assert tags["phase"] in ("tune", "confirm") and tags["outcome"] in ("completed",
                                                                            "pruned")
        assert run.info.status == "FINISHED"
        assert tags["seed"] == ("0" if tags["phase"] == "tune" else tags["seed"])
    confirm = [r for r in tiny_sweep.runs if r.data.tags["phase"] == "confirm"]
    assert sorted((r.data.tags["cell"], r.data.tags["seed"]) for r in confirm) == [
        (CELL_ERM, "1"), (CELL_ERM, "2"), (CELL_TRADES, "1"), (CELL_TRADES, "2")]


def test_params_metrics_and_classwise_artifact(tiny_sweep):
    client = tiny_sweep.tracker.client
    for run in tiny_sweep.runs:
        params = run.data.params
        assert params["method.name"] == run.data.tags["method"]
        assert params["runtime.seed"] == run.data.tags["seed"]
        assert params["scenario.noise_rate"] == "0.2"
        # Each run logs its own method's knobs: TRADES its attack's, ERM none.
        assert params.get("method.eps") == ("0.1" if run.data.tags["method"] == "trades"
                                            else None)
        config = json.loads((tiny_sweep.sweep_dir / run.data.tags["trial_id"] /
                             "params.json").read_text())
        expected = flatten(validate({k: v for k, v in config.items()
                                     if k != SWEEP_KEY}).resolved())
        assert params == {k: str(v) for k, v in expected.items()}
        completed = run.data.tags["outcome"] == "completed"
        # Only trial metrics, none of Ray's.
        assert set(run.data.metrics) == METRIC_NAMES | (BEST_NAMES if completed else set())
        history = client.get_metric_history(run.info.run_id, "train_loss")
        steps = sorted(m.step for m in history)
        last = 3 if run.data.tags["outcome"] == "completed" else steps[-1]
        assert steps == list(range(1, last + 1))
        assert run.data.tags["outcome"] == "completed" or last < 3
        local = client.download_artifacts(run.info.run_id, "classwise.json",
                                          str(tiny_sweep.root / run.info.run_id))
        classwise = json.loads(Path(local).read_text())
        # ERM and TRADES: the evaluation lists only (CAAT adds its training diagnostics).
        assert set(classwise) == {k for k in WITHOUT_AUTOATTACK
                                  if k.startswith(("val_", "test_"))
                                  and (completed or not k.startswith("test_best_"))}
        assert all(len(v) == 3 for v in classwise.values())
        for key, values in classwise.items():
            # Accuracies, and beside them the images per class they were measured on.
            assert (all(int(a) == a >= 1 for a in values) if key.endswith("_count")
                    else all(0 <= a <= 1 for a in values)), key


def test_optuna_studies_record_pruned_trials_as_pruned(tiny_sweep):
    outcome = {r.data.tags["trial_id"]: r.data.tags["outcome"] for r in tiny_sweep.runs}
    studies = study_trials(str(tiny_sweep.sweep_dir))
    assert set(studies) == {CELL_ERM, CELL_TRADES}
    for per_trial in studies.values():
        assert len(per_trial) == 3
        for trial_id, frozen in per_trial.items():
            assert frozen.state.name == {"completed": "COMPLETE",
                                         "pruned": "PRUNED"}[outcome[trial_id]]


def test_confirmation_reruns_each_cells_best_config(tiny_sweep):
    by_id = {r.data.tags["trial_id"]: r for r in tiny_sweep.runs}
    state = load_search_state(str(tiny_sweep.sweep_dir))
    for cell in (CELL_ERM, CELL_TRADES):
        tuned = [r for r in by_id.values() if r.data.tags["cell"] == cell
                 and r.data.tags["phase"] == "tune" and r.data.tags["outcome"] == "completed"]
        best_value = max(r.data.metrics["val_robust_acc"] for r in tuned)
        confirms = [t for t, rec in state.trials.items()
                    if rec["cell"] == cell and rec["phase"] == "confirm"]
        assert len(confirms) == 2
        for t in confirms:
            best = by_id[state.trials[t]["tuned_by"]]  # ties: the earliest trial
            assert best.data.metrics["val_robust_acc"] == best_value
            assert best.data.tags["outcome"] == "completed" and best.data.tags["cell"] == cell
            for key in ("optim.lr", "method.beta", "method.steps"):  # those the method has
                assert by_id[t].data.params.get(key) == best.data.params.get(key)


def test_warm_starts_trained_once_per_scenario_and_seed_and_cached(tiny_sweep):
    cached = sorted(p.name for p in (tiny_sweep.sweep_dir / "warm_starts").iterdir())
    assert len(cached) == 3 and all(n.startswith("erm-") and n.endswith(".pt") for n in cached)


def test_status_shows_each_cell(tiny_sweep, capsys):
    assert main(["status", "tiny", "--storage", str(tiny_sweep.root / "runs")]) == 0
    out = capsys.readouterr().out
    assert "sweep tiny: done" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("pair-",))]
    assert [(r[0], r[1]) for r in rows] == [(CELL_ERM, "tune"), (CELL_ERM, "confirm"),
                                            (CELL_TRADES, "tune"), (CELL_TRADES, "confirm")]
    for r in rows:
        counts = dict(zip(("completed", "running", "pruned", "failed", "interrupted"),
                          map(int, r[2:7]), strict=True))
        assert counts["completed"] + counts["pruned"] == (3 if r[1] == "tune" else 2)
        assert counts["running"] == counts["failed"] == counts["interrupted"] == 0
        assert 0 <= float(r[7]) <= 1 and not math.isnan(float(r[7]))


# ------------------------------------------------------------------- failures


def test_failing_trials_retry_from_checkpoint_or_end_failed_with_their_reason(
        ray_local, tmp_path, monkeypatch, capsys):
    # ERM trials raise once at epoch 2: only a retry that restores the epoch-1 checkpoint
    # gets past it (a restart from scratch would raise again and exhaust max_failures=1).
    # TRADES trials raise at epoch 2 in every attempt: they end failed, the sweep goes on.
    monkeypatch.setenv("CAAT_FAIL_AT_EPOCH", "2:/erm;2:/trades:always")
    space = tiny_space(max_failures=1, asha={"enabled": False})
    path = write_space(tmp_path / "tiny.yaml", space)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Exit 1: the sweep ran to its end, with failed trials.
    assert main(["launch", str(path), "--storage", str(tmp_path / "runs"), "--tracking-uri",
                 uri, "--quiet"]) == 1
    assert "cell pair-0.2_ir-1_eps-0.1/trades: no tuning trial completed" in \
        capsys.readouterr().err
    runs = Tracker(uri, "tiny").trial_runs()
    erm = [r for r in runs if r.data.tags["method"] == "erm"]
    trades = [r for r in runs if r.data.tags["method"] == "trades"]
    assert len(erm) == 3 and len(trades) == 2  # 2 tuning + 1 confirmation; 2 tuning only
    for run in erm:
        assert run.data.tags["outcome"] == "completed" and run.info.status == "FINISHED"
        assert run.data.tags["retries"] == "1"
    for run in trades:
        assert run.data.tags["outcome"] == "failed" and run.info.status == "FAILED"
        assert run.data.tags["error"].endswith(
            "InjectedFailure: injected failure at epoch 2 (CAAT_FAIL_AT_EPOCH, every attempt)")
    states = {c: sorted(t.state.name for t in s.values())
              for c, s in study_trials(str(tmp_path / "runs" / "tiny")).items()}
    assert states == {CELL_ERM: ["COMPLETE", "COMPLETE"], CELL_TRADES: ["FAIL", "FAIL"]}
    manifest = json.loads((tmp_path / "runs" / "tiny" / "sweep.json").read_text())
    assert manifest["state"] == "done"


def test_caat_diagnostics_reach_mlflow_as_metrics(ray_local, tmp_path):
    """A tiny CAAT sweep on a noisy mixture: every trial run carries the direction
    diagnostics per epoch, and its classwise.json their class-wise lists by epoch."""
    space = tiny_space(name="tinycaat", methods=["caat"], confirm={"seeds": []})
    space["search"] = {}  # one trial
    space["base"]["method"] = {"steps": 2, "meta_interval": 2}
    path = write_space(tmp_path / "tinycaat.yaml", space)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["launch", str(path), "--storage", str(tmp_path / "runs"), "--tracking-uri",
                 uri, "--quiet"]) == 0
    tracker = Tracker(uri, "tinycaat")
    [run] = tracker.trial_runs()
    diagnostics = ("frac_anti", "frac_anti_noisy", "frac_anti_clean", "anti_noisy_auc",
                   "meta_pref_noisy_auc", "meta_grad_norm", "meta_active_frac")
    for key in diagnostics:
        steps = [m.step for m in tracker.client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == [1, 2, 3], key
    assert 0 <= run.data.metrics["anti_noisy_auc"] <= 1
    local = tracker.client.download_artifacts(run.info.run_id, "classwise.json", str(tmp_path))
    classwise = json.loads(Path(local).read_text())
    assert set(classwise) == set(WITHOUT_AUTOATTACK)
    assert len(classwise["train_class_frac_anti_by_epoch"]) == 3
    assert classwise["train_class_frac_anti_by_epoch"][-1] == classwise["train_class_frac_anti"]
