//! TODO(owner): lora
