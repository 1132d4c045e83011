"""Scanned slides in the browser: Deep Zoom tiles, the probability overlay and the tumour regions.

``histoscan serve RUN --slides FOLDER`` adds them to the model's server; ``open_viewer(FOLDER)`` serves
them alone from Python (a notebook, a script) and returns the URL.
"""

from histoscan.serving.slides.notebook import ViewerServer, open_viewer, show_viewer

__all__ = ["ViewerServer", "open_viewer", "show_viewer"]
