"""The local service stack and deployment helpers (not part of the pipeline package)."""
