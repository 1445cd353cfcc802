"""`caat-sweep analyze` logs what it wrote as artifacts `analysis/` of the sweep's parent run,
on the synthetic MLflow store of analysis_store.py: the same files as in --out, replaced by a
re-run; a failed upload is one warning and the local files are still complete; the command
still imports neither Ray nor torch. The slow test opens the parent run's Artifacts tab in
the MLflow UI in headless Chromium (scripts/ui_screenshot.py --artifact)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from analysis_store import StoreWriter, build_store
from mlflow import MlflowClient
from sweep_support import free_port, needs_chromium, run_python

from sweeper.cli import main
from sweeper.contract import ANALYSIS_ARTIFACTS, log_analysis, open_client, parent_run_id
from trainables.errors import ServiceUnavailable

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "ui_screenshot.py"

WARNING = "warning: outputs not logged to MLflow"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return build_store(tmp_path_factory.mktemp("mlflow"))


def parent_of(uri: str, sweep: str) -> str:
    run_id = parent_run_id(open_client(uri), sweep)
    assert run_id is not None
    return run_id


def logged(uri: str, run_id: str) -> dict[str, int]:
    """{file name: size} under the run's analysis/ artifacts."""
    infos = MlflowClient(tracking_uri=uri).list_artifacts(run_id, ANALYSIS_ARTIFACTS)
    return {Path(i.path).name: i.file_size for i in infos if not i.is_dir}


def local_files(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in out.iterdir()}


def artifact_file(uri: str, run_id: str, name: str) -> Path:
    """Where a local artifact store keeps one of the run's analysis artifacts."""
    root = MlflowClient(tracking_uri=uri).get_run(run_id).info.artifact_uri
    return Path(root.removeprefix("file://")) / ANALYSIS_ARTIFACTS / name


def test_analyze_logs_every_output_under_the_parent_run(store, tmp_path, capsys):
    out = tmp_path / "toy"
    # A file of the user's in OUT is not the analysis': it stays local.
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["analyze", "toy", "--out", str(out), "--tracking-uri", store]) == 0
    stdout = capsys.readouterr().out
    run_id = parent_of(store, "toy")
    assert f"logged as artifacts analysis/ of the sweep's parent run {run_id}" in stdout

    shown = logged(store, run_id)
    written = local_files(out)
    del written["notes.txt"]
    assert shown == written
    assert {"summary.md", "summary.html", "summary.csv", "summary.tex", "classwise.csv",
            "selected_runs.csv", "tradeoff.png"} <= set(shown)
    # The parent's own artifact is still there, beside the folder.
    top = MlflowClient(tracking_uri=store).list_artifacts(run_id)
    assert {i.path for i in top} == {"space.yaml", ANALYSIS_ARTIFACTS}


def test_a_rerun_replaces_the_logged_files(store, tmp_path, capsys):
    out = tmp_path / "toy"
    assert main(["analyze", "notrades", "--out", str(out), "--tracking-uri", store]) == 0
    run_id = parent_of(store, "notrades")
    stale = artifact_file(store, run_id, "summary.md")
    stale.write_text("an older analysis")
    assert main(["analyze", "notrades", "--out", str(out), "--tracking-uri", store]) == 0
    capsys.readouterr()
    assert stale.read_text() == (out / "summary.md").read_text()
    assert logged(store, run_id) == local_files(out)


def test_a_failed_upload_warns_once_and_keeps_the_local_files(tmp_path, capsys):
    uri = build_store(tmp_path)
    # The artifact store refuses the upload: a file stands where analysis/ would go.
    run_id = parent_of(uri, "notrades")
    blocker = artifact_file(uri, run_id, "")
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a folder")
    out = tmp_path / "out"
    assert main(["analyze", "notrades", "--out", str(out), "--tracking-uri", uri]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(WARNING + " (")
    assert warnings[0].endswith("the files above are complete; run analyze again to log "
                                "them")
    assert {"summary.md", "summary.html", "tradeoff.png"} <= set(local_files(out))
    assert "logged as artifacts" not in captured.out


def test_a_sweep_without_parent_run_warns(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    w = StoreWriter(uri, tmp_path / "artifacts")
    exp = w.client.create_experiment("caat-sweep/orphan",
                                     artifact_location=str(tmp_path / "artifacts"))
    w.trial(exp, "gone", "orphan", "clean", "caat", 0, "confirm", "completed",
            dict.fromkeys(("natural_acc", "robust_acc", "worst_class_natural_acc",
                           "worst_class_robust_acc", "class_natural_acc_std",
                           "boundary_error"), 0.5))
    out = tmp_path / "out"
    assert main(["analyze", "orphan", "--out", str(out), "--tracking-uri", uri]) == 0
    err = capsys.readouterr().err
    assert (f"warning: sweep 'orphan' has no parent run in {uri}: outputs not logged to "
            "MLflow") in err.splitlines()
    assert (out / "summary.md").is_file()


def test_an_unreachable_tracking_server_is_said_quickly(tmp_path):
    out = tmp_path / "summary.md"
    out.write_text("x")
    uri = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    with pytest.raises(ServiceUnavailable, match=f"cannot reach {uri}"):
        log_analysis(uri, "toy", [out])


def test_analyze_with_its_upload_imports_neither_ray_nor_torch(store, tmp_path):
    out = tmp_path / "toy"
    code = ("import json, sys; from sweeper.cli import main; "
            f"code = main(['analyze', 'notrades', '--out', {str(out)!r}, '--tracking-uri', "
            f"{store!r}]); "
            "print(json.dumps([code, sorted({m.split('.')[0] for m in sys.modules} "
            "& {'ray', 'torch'})]))")
    proc = run_python(code)
    assert "logged as artifacts analysis/" in proc.stdout
    assert json.loads(proc.stdout.splitlines()[-1]) == [0, []]


@pytest.mark.slow
@needs_chromium
def test_the_mlflow_ui_shows_the_analysis_beside_the_parent_run(tmp_path):
    uri = build_store(tmp_path)
    out = tmp_path / "out"
    assert main(["analyze", "toy", "--out", str(out), "--tracking-uri", uri]) == 0
    text = tmp_path / "artifacts.txt"
    # The MLflow UI takes ~25 s to start on two cores; the generous wait is for a loaded CI
    # machine (the script stops waiting as soon as the page shows the artifact).
    proc = subprocess.run([sys.executable, str(SCRIPT), "toy", "--tracking-uri", uri,
                           "--artifact", "analysis/summary.html", "--text", str(text),
                           "--timeout", "300"],
                          capture_output=True, text=True, timeout=1000)
    assert proc.returncode == 0, proc.stderr
    lines = text.read_text().splitlines()
    # The run's artifact tree: the analysis folder, expanded onto every file analyze wrote,
    # beside the parent's space.yaml; and the selected file's preview header.
    assert {"Artifacts", ANALYSIS_ARTIFACTS, "space.yaml", "analysis/summary.html"} <= set(lines)
    assert set(local_files(out)) <= set(lines), lines
