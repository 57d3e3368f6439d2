"""Weight quantization: the pipeline, GPTQ and the quality report."""
