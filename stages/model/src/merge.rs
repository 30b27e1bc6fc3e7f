//! TODO(owner): merge
