"""Durable state: atomic writes and directory commits, manifests, training checkpoints, exact resume."""
