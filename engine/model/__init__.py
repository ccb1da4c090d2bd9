"""Llama-family decoder loaded from a Hugging Face safetensors folder."""
