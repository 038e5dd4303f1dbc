"""RL loops: the actor side of GRPO/PPO (rounds: sample, score), the learner side (experience,
policy loss, update), the PPO critic, distillation steps and teacher data, the sample stage's keep
rules. The math they call lives in `rlft.core`."""
