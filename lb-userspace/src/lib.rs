//! The xlb daemon and CLI. One module per job; only `dataplane` loads programs and touches maps.
pub mod acme;
pub mod admin;
pub mod challenges;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod health;
pub mod notify;
pub mod sockdiag;
pub mod status;
