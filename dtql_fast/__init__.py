"""dtql_fast: a fast, verified trainer for Diffusion Trusted Q-Learning."""
__version__ = "0.1.0"
