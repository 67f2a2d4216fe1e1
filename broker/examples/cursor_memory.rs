//! The memory and stored size of a cursor with 100,000 and 1,000,000
//! individually acknowledged holes (every other entry acked), as docs/benchmarks.md
//! reports it:
//!
//!   cargo run --release -p magnetar-broker --example cursor_memory
//!
//! Memory is the growth of the process's resident set while the structure
//! is built (page-granular, so good to a few KiB); the old form (a set of
//! positions) is built beside it.

use std::collections::BTreeSet;
use std::time::Instant;

use magnetar_broker::managed_ledger::cursor::{CursorState, Position};

/// Resident bytes of this process (Linux), 0 where unknown.
fn live() -> isize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: isize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    // Each size in a fresh process, so memory freed by one is not reused
    // by the next.
    match std::env::args().nth(1).and_then(|a| a.parse().ok()) {
        Some(holes) => measure(holes),
        None => {
            for holes in ["100000", "1000000"] {
                let me = std::env::current_exe().expect("own path");
                let status = std::process::Command::new(me).arg(holes).status();
                assert!(status.is_ok_and(|s| s.success()), "measuring {holes}");
            }
        }
    }
}

fn measure(holes: i64) {
    const LEDGER: u64 = 42;
    let n = 2 * holes + 1;
    let next = |p: Position| {
        let e = if p.ledger_id < LEDGER {
            0
        } else {
            p.entry_id + 1
        };
        (p.ledger_id <= LEDGER && e < n).then_some(Position::new(LEDGER, e))
    };

    let before = live();
    let t = Instant::now();
    let mut c = CursorState::new(Position::new(LEDGER, -1));
    for e in (1..n).step_by(2) {
        c.ack(Position::new(LEDGER, e), &next);
    }
    let build = t.elapsed();
    let heap = live() - before;
    let t = Instant::now();
    let stored = c.encode();
    let encode = t.elapsed();
    let t = Instant::now();
    let back = CursorState::decode(&stored);
    let decode = t.elapsed();
    assert_eq!(back.as_ref(), Ok(&c), "the stored form reads back");
    drop(back);

    let before = live();
    let old: BTreeSet<Position> = (1..n)
        .step_by(2)
        .map(|e| Position::new(LEDGER, e))
        .collect();
    let old_heap = live() - before;
    let old_json = serde_json::to_vec(&old).map(|v| v.len()).unwrap_or(0);

    println!(
        "{holes} holes ({} acked ranges): {:.0} KiB in memory ({:.2} B/hole), stored {:.1} KiB ({:.2} B/hole); \
         {:.1} ms to ack them all, encode {:.2} ms, decode {:.2} ms",
        c.acked_ranges().count(),
        heap as f64 / 1024.0,
        heap as f64 / holes as f64,
        stored.len() as f64 / 1024.0,
        stored.len() as f64 / holes as f64,
        build.as_secs_f64() * 1e3,
        encode.as_secs_f64() * 1e3,
        decode.as_secs_f64() * 1e3,
    );
    println!(
        "before (a set of acked positions, JSON when stored): {:.0} KiB in memory, stored {:.0} KiB",
        old_heap as f64 / 1024.0,
        old_json as f64 / 1024.0,
    );
}
