"""Structure optimization: pruning, quantization, distillation, entropy-coded storage."""
