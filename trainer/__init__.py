"""puremesh."""
