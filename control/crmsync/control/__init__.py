"""The control plane: supervisor, HTTP API, web page and the crmsync CLI."""
