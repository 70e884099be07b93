"""lorafleet: fine-tune open LLMs on Ray Train, sweep with Ray Tune, serve many LoRA adapters with
Ray Serve + vLLM. The modules are building blocks; `jobs/`, `tune/` and `serve/` hold the entry points.
"""

__version__ = "0.1.0"
