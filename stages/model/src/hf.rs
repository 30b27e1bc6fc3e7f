//! TODO(owner): hf
