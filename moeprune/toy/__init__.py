"""The toy world: a synthetic multi-class task world and the small trained MoE shipped as the default model."""
