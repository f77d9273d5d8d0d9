"""Quantization: the llama.cpp GGUF tier ladder (imatrix, ContribDynamic tiers) and NVFP4A16."""
