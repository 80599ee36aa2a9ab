"""Files: atomic writes, provenance, output guards, run-folder locks, the safetensors header (no torch import here)."""
