"""Ray Serve application builder: `serve run serve/config.yaml` imports `serve.app:build_app`.

Everything lives in the library (lorafleet.serving.app); this entry file only imports it.
"""

from lorafleet.serving.app import build_app

__all__ = ["build_app"]
