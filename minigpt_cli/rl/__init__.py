"""RL fine-tuning: training steps whose data the inference engine samples (grpo.py)."""
