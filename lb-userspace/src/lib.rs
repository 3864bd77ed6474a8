//! The xlb daemon and CLI. One module per job; only `dataplane` loads programs and touches maps.
pub mod acme;
pub mod admin;
pub mod alert;
pub mod backends;
pub mod certs;
pub mod challenges;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod health;
pub mod https;
pub mod layout;
pub mod listeners;
pub mod notify;
pub mod rollout;
pub mod sockdiag;
pub mod status;
