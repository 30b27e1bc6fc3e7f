//! TODO(owner): generate
