# pyright: strict, reportUnknownMemberType=false, reportUnknownArgumentType=false, reportUnknownVariableType=false
"""The loss core: the math of ALGORITHMS.md as pure functions over tensors (losses, log-probs and
divergences, advantages). Imports torch only; nothing here loads a model or reads a file."""
