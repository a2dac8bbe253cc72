"""The language-model runtime: config, tokenizer, weights, the decoder, generation, compiled decode."""
