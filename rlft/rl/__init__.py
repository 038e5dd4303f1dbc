# pyright: strict, reportUnknownMemberType=false, reportUnknownArgumentType=false, reportUnknownVariableType=false
"""RL loops: GRPO/PPO rounds (sample, score, build experience, update), the PPO critic, distillation
steps and teacher data, the sample stage's keep rules. The math they call lives in `rlft.core`."""
