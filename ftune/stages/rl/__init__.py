"""Online reinforcement learning for `ftune grpo`: rewards, losses and sampling."""
