"""The torch engine: a Hugging Face causal LM run one decoder block at a time, LoRA merging, and the
adapters that let AutoAWQ calibrate and pack streamed blocks."""
