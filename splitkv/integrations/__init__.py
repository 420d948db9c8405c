"""Integrations of splitkv with other libraries; each submodule imports its library on import.

- :mod:`splitkv.integrations.transformers`: shared prompts in Hugging Face
  transformers (``pip install "splitkv[hf]"``).
"""
