"""The Tune function trainable: one trial = one resolved training config run by its own
TorchTrainer. Ray Tune pickles `run_trial` by reference, so it stays at this module path
(and is re-exported as `lorafleet.sweep.run_trial`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorafleet.sweep.spec import SweepSpec, trial_config

__all__ = ["run_trial", "trainable"]


def _report_callback(metric: str):
    """TuneReportCallback that forwards only evaluation reports (those carrying the metric).

    Tune checks that every result has the metric ASHA and the searcher use; the training loop
    also reports loss every `log_every` steps without it. Those stay in train_log.jsonl.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class EvalReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return EvalReportCallback()


def run_trial(params: dict[str, Any], spec: dict[str, Any]) -> None:
    """The Tune function trainable: resolve this trial's config, run its TorchTrainer, re-raise errors.

    Runs in a Tune trial actor that holds no CPU (see `trainable`); the TorchTrainer asks for
    the trial's workers itself. The Train run is named after the trial, so a trial restarted by
    --resume continues from its last checkpoint instead of starting over.
    """
    import ray
    from ray import tune

    from lorafleet.base_model import load_tokenizer
    from lorafleet.train.context import RunContext
    from lorafleet.train.dataset import build_dataset
    from lorafleet.train.worker import build_trainer

    spec_obj = SweepSpec.model_validate(spec)
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(spec_obj, params, trial_id)
    ctx = RunContext.build(cfg, resume_dir=Path(cfg.run.storage_path) / trial_id)  # Tune may restart a trial
    ctx.place.save_config()
    ray.data.DataContext.get_current().enable_progress_bars = False

    tokenizer = load_tokenizer(cfg.model.name_or_path, cfg.model.trust_remote_code)
    trainer = build_trainer(
        ctx.cfg,
        build_dataset(ctx.encode(tokenizer), tokenizer.pad_token_id, ctx.cfg),
        run_name=trial_id,
        val_rows=ctx.rows("validation"),
        labels=ctx.labels,
        log_path=ctx.place.file("train_log.jsonl"),
        callbacks=[_report_callback(spec_obj.metric)],
    )
    result = trainer.fit()
    if result.error:
        raise result.error


def trainable(spec: SweepSpec):
    """`run_trial` with this sweep's spec bound and the trial's own (token) resources."""
    from ray import tune

    # The trial's own driver holds no CPU: its TorchTrainer reserves the workers. Tune rejects an
    # all-zero request ({"CPU": 0}); a token amount of `memory`, a resource every node has, is
    # accepted and leaves the CPUs to the workers, so max_concurrent_trials x workers fill the cluster.
    return tune.with_resources(
        tune.with_parameters(run_trial, spec=spec.model_dump(mode="json")), {"CPU": 0, "memory": 2**20}
    )
