//! The end-to-end tier, in one test binary so the harness (`blog_tests`)
//! and the service crates link once: the real binaries as OS processes on
//! 127.0.0.1, driven through the gateway. One module per concern; a test is
//! found by its path (`cargo test --test e2e faults::`).
//!
//! The flow and bad-input suites run twice, as [`in_both_modes!`] lists them:
//! `<module>::single::<test>` on one process per service, and
//! `<module>::scaled::<test>` on two replicas of every service on
//! PostgreSQL, the bus's on a 3-node JetStream (`cargo test --test e2e scaled::`).

/// Runs each listed test body (`async fn <test>(mode: Mode)` in the calling
/// module) in both modes: `single::<test>` and `scaled::<test>` (2 replicas;
/// skipped outside CI when PostgreSQL cannot be installed).
macro_rules! in_both_modes {
    ($($name:ident),+ $(,)?) => {
        mod single {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(blog_tests::Mode::Single).await;
                }
            )+
        }
        mod scaled {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if let Some(mode) = blog_tests::Mode::scaled(2) {
                        super::$name(mode).await;
                    }
                }
            )+
        }
    };
}

mod bad_input;
mod browser;
mod bus_faults;
mod durability;
mod faults;
mod flow;
mod front_door;
mod observability;
mod read_path;
mod scale_faults;
