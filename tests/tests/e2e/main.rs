//! The end-to-end tier, in one test binary so the harness (`blog_tests`)
//! and the service crates link once: the real binaries as OS processes on
//! 127.0.0.1, driven through the gateway. One module per concern; a test is
//! found by its path (`cargo test --test e2e faults::`).

mod bad_input;
mod browser;
mod durability;
mod faults;
mod flow;
mod front_door;
mod read_path;
