"""One training loop for every model (Lightning), driven by one config."""
