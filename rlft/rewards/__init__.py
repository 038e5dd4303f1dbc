"""Rewards: built-in verifiers and the name table, the runner (workers, timeouts, error policy), the sandbox."""
