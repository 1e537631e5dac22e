//! Code shared by the benchmark binaries: [`common`] (preflight, machine description, timing
//! helpers), [`harness`] (signals, child processes, mounts, the shaped registry, conversion),
//! [`pyimage`] (the Python function image built from Debian packages and its traced start-up
//! set) and [`chart`] (PNG bar charts).

pub mod chart;
pub mod common;
pub mod harness;
pub mod pyimage;
