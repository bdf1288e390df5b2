"""Students in and out: Hugging Face directories and GGUF files read into our parameter trees
(`hf_io`, `gguf_io`, `pretrained`), round checkpoints loaded for the tools (`student`), exports,
and the pad token added to tokenizers without one (`vocab`). `models/` is the network alone."""
