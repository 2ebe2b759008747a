"""HTTP adapter (FastAPI)."""
