//! TODO(owner): backend
