"""Files: safetensors, adapter and parameter files, PyTorch names and layouts, PEFT (both ways), GGUF."""
