"""File formats, one reader and one writer each: Hugging Face checkpoint folders and safetensors, GGUF
(read, write, split shards) and the tokenizer vocabulary a GGUF carries."""
