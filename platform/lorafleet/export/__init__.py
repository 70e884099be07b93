"""Exporting a registry version out of lorafleet (`lorafleet adapters export`).

A LoRA version becomes a plain peft folder (``adapter_config.json`` + ``adapter_model.safetensors``, its
``base_model_name_or_path`` naming the base) or, with ``merge``, the adapter merged into its base
(peft ``merge_and_unload``) as an HF model folder that transformers loads and vLLM serves as a plain
model; a full or partial fine-tune is copied whole. Every export carries a model card (README.md) written
from the version's metadata, and can be pushed to the Hugging Face Hub.

Modules: ``weights.py`` (merge, dtype conversion), ``card.py`` (the model card), ``flow.py``
(``export_artifact``: the verified copy, the staging folder and the one rename, ``push_to_hub``).
"""

from lorafleet.export.flow import ExportError, ExportResult, export_artifact, push_to_hub

__all__ = ["ExportError", "ExportResult", "export_artifact", "push_to_hub"]
