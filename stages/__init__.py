"""Stage logic for the Noisy Student pipeline: plain PyTorch/NumPy, callable and testable without Ray."""
