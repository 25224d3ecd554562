//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod daemon;
pub mod nbd_client;
pub mod tagged_block;
