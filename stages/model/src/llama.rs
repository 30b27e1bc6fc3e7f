//! TODO(owner): llama
