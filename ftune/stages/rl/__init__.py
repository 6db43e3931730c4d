"""Online reinforcement learning for `ftune grpo`: rewards, losses, sampling, a step's rollout and the run's state."""
