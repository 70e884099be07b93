"""Batch inference (`lorafleet predict`, `jobs/predict.py`): registry adapters over a whole dataset on
Ray Data + vLLM, one output column per adapter, written in resumable blocks (docs/PREDICT.md).

``flow.run_predict`` is the run, top to bottom; ``columns`` resolves the adapters, ``rows`` reads the
data (bad rows skipped), ``replica`` is the vLLM engine actor, ``output`` the part files.
"""

from lorafleet.predict.columns import Column, PredictError
from lorafleet.predict.flow import PredictResult, run_predict

__all__ = ["Column", "PredictError", "PredictResult", "run_predict"]
