//! TODO(owner): tiny
