"""UniModel plugin SDK and worker runtime (being written)."""
