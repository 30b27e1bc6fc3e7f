//! newt-graph
