//! GGUF reader, dequantization, tokenizer rebuild, writer.
