//! TODO(owner): peft
