"""rlft: recipe-driven SFT -> GRPO -> rejection sampling -> retrain -> distill for causal LMs."""

__version__ = "0.1.0"
