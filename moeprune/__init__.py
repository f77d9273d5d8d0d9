"""moeprune: profile, prune, quantize and evaluate Mixture-of-Experts LLMs from one Hydra config."""

__version__ = "0.1.0"
