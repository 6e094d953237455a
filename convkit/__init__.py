"""convkit: streaming conversion and quantization of diffusion checkpoints."""
__version__ = "0.1.0"
