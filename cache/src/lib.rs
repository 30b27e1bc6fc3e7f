//! newt-cache
