//! TODO(owner): tensors
