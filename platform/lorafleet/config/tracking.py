"""The `tracking:` block of a training config: where a run, a sweep's trials and a ladder's rungs are
logged besides their own folders (MLflow, TensorBoard). Off by default; `MLFLOW_TRACKING_URI` in the
driver's environment turns MLflow on. Sweeps and ladders take it from their training config
(a sweep's `overrides:`, a ladder's `base:`), so one block serves all three."""

from __future__ import annotations

import os

from pydantic import Field

from lorafleet.config.base import Section

__all__ = ["MLFLOW_URI_ENV", "MLFLOW_EXPERIMENT_ENV", "MlflowSettings", "TensorboardSettings", "TrackingConfig"]

MLFLOW_URI_ENV = "MLFLOW_TRACKING_URI"  # MLflow's own variables: a team's server is usually set this way
MLFLOW_EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"


class MlflowSettings(Section):
    """Logging to an MLflow tracking server (or any tracking URI MLflow's client takes)."""

    enabled: bool | None = Field(
        None,
        description="Log to MLflow. Default: on when tracking_uri or $MLFLOW_TRACKING_URI (driver's environment) "
        "is set; false keeps it off even then.",
    )
    tracking_uri: str | None = Field(
        None,
        description="The tracking server, e.g. http://mlflow.internal:5000 (or file:/..., databricks); "
        "default $MLFLOW_TRACKING_URI. Credentials go in MLflow's own variables "
        "(MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME/PASSWORD), not here: this config is saved with every run.",
    )
    experiment: str | None = Field(
        None, min_length=1,
        description="Experiment name, created when missing; default $MLFLOW_EXPERIMENT_NAME, else 'lorafleet'.",
    )
    tags: dict[str, str] = Field(default_factory=dict, description="Extra tags on every run (team, project, ...).")
    log_artifacts: bool = Field(
        True, description="Upload the run's summary, resolved config and charts (sweep.png, ladder.png) as artifacts."
    )

    def uri(self) -> str | None:
        """The tracking URI to log to, or None when MLflow is off (read on the driver, at run start)."""
        if self.enabled is False:
            return None
        return self.tracking_uri or os.environ.get(MLFLOW_URI_ENV) or None

    def experiment_name(self) -> str:
        return self.experiment or os.environ.get(MLFLOW_EXPERIMENT_ENV) or "lorafleet"


class TensorboardSettings(Section):
    """TensorBoard event files: a second, file-only sink (no server)."""

    dir: str | None = Field(
        None,
        description="Folder of the event files, one subfolder per run ('${home}' expands); "
        "default: no TensorBoard files. View with `tensorboard --logdir DIR`.",
    )


class TrackingConfig(Section):
    """Where runs are tracked besides their folders: MLflow and/or TensorBoard."""

    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    tensorboard: TensorboardSettings = Field(default_factory=TensorboardSettings)
