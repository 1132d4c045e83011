"""Serve a model over HTTP: FastAPI routers, micro-batching, a web page."""
