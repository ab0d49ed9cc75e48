"""dvp: Hierarchical VAEs with a Diffusion-based VampPrior (Kuzina & Tomczak, TMLR 2024) and their baselines."""
__version__ = "0.1.0"
