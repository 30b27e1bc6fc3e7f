//! newt-stages
