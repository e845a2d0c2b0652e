"""Command-line entry points for training: tokenizer, vqvae, dataset encoding, transformer."""
