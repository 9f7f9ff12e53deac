//! Free ports for the servers a test, a benchmark or a local cluster starts.
//!
//! Asking the OS for port 0 and closing the socket races: the OS hands the
//! same ephemeral ports out again, to the next caller and to outgoing
//! connections, so a suite starting a dozen servers while other suites ran
//! collided with them (`Address already in use`, or another suite's server
//! answering its health check). These ports come from below Linux's ephemeral
//! range (32768 and up), so no outgoing connection takes them; from one
//! counter per process, so no two callers in a process get the same port;
//! starting at an offset from the process id, so processes running at once
//! start far apart; and a port that cannot be bound right now is skipped.

use std::{
    net::TcpListener,
    sync::atomic::{AtomicU32, Ordering},
};

/// The first port handed out.
const FIRST: u32 = 20_000;
/// How many ports there are to hand out (20000 to 31999).
const SPAN: u32 = 12_000;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A port on 127.0.0.1 that was free a moment ago and that this process has
/// not handed out before (until it has handed out all [`SPAN`]), for a server
/// another process will bind.
pub fn free_port() -> u16 {
    free_listener().local_addr().expect("a bound listener has an address").port()
}

/// A listener on one of the ports [`free_port`] hands out, already bound: for
/// a server of this process, which then has no moment between choosing its
/// port and binding it in which another process could take the port.
pub fn free_listener() -> TcpListener {
    // Processes with consecutive ids start ~2,000 ports apart.
    let offset = std::process::id().wrapping_mul(1_999) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(FIRST + (offset + n) % SPAN).expect("ports below 32000");
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            return listener;
        }
    }
    // Everything in the range is taken: fall back on the OS's choice.
    TcpListener::bind("127.0.0.1:0").expect("a free port")
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        assert_eq!(ports.iter().collect::<HashSet<_>>().len(), ports.len(), "a port handed out twice");
        for port in &ports {
            assert!((20_000..32_000).contains(port), "{port}");
        }
        // A port someone holds is skipped.
        let held = TcpListener::bind(("127.0.0.1", ports[199] + 1)).ok();
        let next = free_port();
        if let Some(held) = held {
            assert_ne!(next, held.local_addr().unwrap().port());
        }
        TcpListener::bind(("127.0.0.1", next)).expect("the port is free");
    }

    #[test]
    fn a_free_listener_is_bound_on_a_port_no_one_else_was_handed() {
        let listener = free_listener();
        let port = listener.local_addr().unwrap().port();
        assert!((20_000..32_000).contains(&port), "{port}");
        // Held: the next port handed out is another one, and the port cannot be bound again.
        assert_ne!(free_port(), port);
        assert!(TcpListener::bind(("127.0.0.1", port)).is_err(), "the listener holds its port");
    }
}
