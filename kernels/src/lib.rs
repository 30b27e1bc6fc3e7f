//! newt-kernels
