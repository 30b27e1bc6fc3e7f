//! newt-data
