"""Reinforcement learning with verifiable rewards (the GRPO family) as an objective of thinktune's loop.

`problems` loads question/reference-answer rows, `rollout` samples completions on the model being
trained, `rewards` scores them, `loss` holds the GRPO-family losses as small functions over the same
tensors, and `objective` joins them into the objective the training loop runs.
"""
