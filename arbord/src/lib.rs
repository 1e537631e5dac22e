//! The Arbor node daemon: serves containerd's snapshots API (a proxy snapshotter plugin named
//! `arbor`) from [`arbor_snapshotter`], with its configuration ([`config`]) and life cycle
//! ([`daemon`]: restore, serve, metrics, write-back, shutdown). The binary is a thin `main`.

pub mod config;
pub mod daemon;
