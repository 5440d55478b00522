"""GGUF export: one streaming writer, llama.cpp's quantization mixes, tokenizer metadata."""
