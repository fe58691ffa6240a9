//! The engine's tests use the one harness of the workspace.

#![allow(unused_imports)]

pub use strait_testkit::*;
