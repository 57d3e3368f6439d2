"""The model: plain single-device PyTorch (transformer, MoE, kernels, fused ops, quantized layers)."""
