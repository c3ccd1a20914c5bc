"""`MlflowWriter`: a Tracker or `vitdiag trend` writer that logs to MLflow.

    tracker = Tracker(model, "data/train", writer=MlflowWriter(tracking_uri="file:./mlruns"))

Metric names are vitdiag's own (`tracker.finite_metrics`: ``<probe>.<metric>``, which MLflow
accepts as they are); None and non-finite values are not logged (not measured).
"""

from __future__ import annotations

import time
from typing import Any

from vitdiag.errors import VitdiagError
from vitdiag.tracker import finite_metrics

DEFAULT_EXPERIMENT = "vitdiag"


def _client(tracking_uri: str | None) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def _require() -> None:
    try:
        import mlflow  # noqa: F401
    except ImportError:
        raise VitdiagError(
            "MlflowWriter needs the mlflow package; install vitdiag[mlflow]."
        ) from None


class MlflowWriter:
    """`writer(step, metrics)` logging to an MLflow run.

    run: an `mlflow.entities.Run` (e.g. `mlflow.active_run()`) or a run id to log into, left
        open on close(); None starts a run of its own in `experiment` (created when missing),
        ended by close().
    tracking_uri: where MLflow stores runs (``file:./mlruns``, ``http://host:5000``); None is
        MLflow's own default (MLFLOW_TRACKING_URI, else ./mlruns).
    """

    def __init__(
        self,
        run: Any = None,
        *,
        tracking_uri: str | None = None,
        experiment: str = DEFAULT_EXPERIMENT,
        run_name: str | None = None,
    ) -> None:
        _require()
        from mlflow.exceptions import MlflowException

        self._own = run is None
        try:
            self.client = _client(tracking_uri)
            if run is None:
                found = self.client.get_experiment_by_name(experiment)
                experiment_id = (
                    found.experiment_id if found else self.client.create_experiment(experiment)
                )
                run = self.client.create_run(experiment_id, run_name=run_name)
        except MlflowException as e:
            # MLflow 3 refuses a file store unless MLFLOW_ALLOW_FILE_STORE=true, among others
            first = str(e.message).split(". ")[0]
            raise VitdiagError(
                f"MLflow cannot log to {tracking_uri or 'its default store'} ({first}); give "
                "another tracking URI, or for a file store set MLFLOW_ALLOW_FILE_STORE=true."
            ) from None
        self.run_id = run if isinstance(run, str) else run.info.run_id

    def __call__(self, step: int, metrics: dict[str, Any]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, v, now, int(step)) for k, v in finite_metrics(metrics).items()]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def close(self) -> None:
        """End the run when this writer started it."""
        if self._own:
            self.client.set_terminated(self.run_id)
            self._own = False
