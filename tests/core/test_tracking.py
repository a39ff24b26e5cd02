"""Tracking faults: an unreachable MLflow server stops a stage before any work, or (when the config says so)
is replaced by the local store with a warning."""

import json
from pathlib import Path

import pytest

from tests.conftest import RUN, cli, free_port



def _no_training(*args, **kwargs):
    raise AssertionError("training started although the tracking server is unreachable")


def test_unreachable_server_fails_fast_before_training(project, capsys, monkeypatch):
    assert cli("prepare", "--config", str(project)) == 0
    from pipeline.train import stage as train

    monkeypatch.setattr(train, "load_base", _no_training)
    uri = f"http://127.0.0.1:{free_port()}"
    capsys.readouterr()
    assert cli("train", "--config", str(project), f"tracking.uri={uri}") == 2
    err = capsys.readouterr().err
    port = uri.rsplit(":", 1)[1]
    assert err == (f"error: tracking.uri={uri}: cannot reach the MLflow tracking server: TCP connect to "
                   f"127.0.0.1:{port} refused (services.timeout_s=5); start it, unset MLFLOW_TRACKING_URI, or set "
                   "tracking.on_unreachable=local\n")
    assert not Path("runs").exists() and not Path("mlflow.db").exists()
    # the same through the environment variable users usually set
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert cli("train", "--config", str(project)) == 2
    assert f"error: MLFLOW_TRACKING_URI={uri}: cannot reach the MLflow tracking server" in capsys.readouterr().err
    assert not Path("runs").exists()


def test_unreachable_server_falls_back_to_the_local_store_when_configured(project, capsys, caplog):
    assert cli("prepare", "--config", str(project)) == 0
    uri = f"http://127.0.0.1:{free_port()}"
    with caplog.at_level("WARNING"):
        assert cli("train", "--config", str(project), f"tracking.uri={uri}", "tracking.on_unreachable=local") == 0
    local = f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"
    warnings = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    port = uri.rsplit(":", 1)[1]
    assert warnings == [f"MLflow server {uri} is unreachable (TCP connect to 127.0.0.1:{port} refused); logging to "
                        f"the local store {local} instead"]
    manifest = json.loads((Path("runs") / RUN / "model" / "manifest.json").read_text())
    assert manifest["config"]["tracking"]["uri"] == local  # the manifest says where the run really went
    import mlflow

    run = mlflow.MlflowClient(tracking_uri=local).get_run(manifest["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["train.lora.r"] == "4"


def test_eval_fails_fast_before_writing_the_report(project, capsys):
    off = ["--config", str(project), "tracking.enabled=false", "eval.lexical=false"]
    assert cli("prepare", *off) == 0 and cli("train", *off) == 0 and cli("embed", *off) == 0
    uri = f"http://127.0.0.1:{free_port()}"
    capsys.readouterr()
    assert cli("eval", "--config", str(project), "eval.lexical=false", f"tracking.uri={uri}") == 2
    assert f"error: tracking.uri={uri}: cannot reach the MLflow tracking server" in capsys.readouterr().err
    assert not Path("reports").exists()


@pytest.mark.parametrize("status", [200, 503])
def test_reachability_probe_reads_the_health_endpoint(status):
    """A server answering 5xx on /health is treated as down; a 2xx one as up."""
    import http.server
    import threading

    from pipeline.core.config import Config
    from pipeline.core.services import mlflow_service, probe

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        cfg = Config.model_validate({"tracking": {"uri": f"http://127.0.0.1:{server.server_port}"}})
        assert (probe(mlflow_service(cfg), 5.0) is None) is (status == 200)
    finally:
        server.shutdown()
        server.server_close()


def test_only_a_missing_run_starts_a_new_one(project, monkeypatch):
    """A run id the store does not hold starts a new run; any other lookup failure is an error."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline.core import tracking
    from pipeline.core.config import load_config
    from pipeline.core.errors import TrackingError

    cfg = load_config(project)
    with tracking.run(cfg, run_name="r", run_id="0" * 32) as tracker:  # not in this store: a fresh run
        assert tracker.run_id != "0" * 32

    def unavailable(run_id):
        raise MlflowException("database is locked", error_code="TEMPORARILY_UNAVAILABLE")

    monkeypatch.setattr(mlflow, "get_run", unavailable)
    with pytest.raises(TrackingError, match="database is locked"):
        with tracking.run(cfg, run_name="r", run_id=tracker.run_id):
            pass
