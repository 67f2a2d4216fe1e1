//! The log filter, changeable while the process runs: the binary installs
//! its subscriber's reload hook here; `PUT /admin/v2/brokers/log-level`
//! calls it.

use std::sync::OnceLock;

type Reload = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

static RELOAD: OnceLock<Reload> = OnceLock::new();

/// Installs the function that replaces the log filter (once per process).
pub fn set_reloader(f: impl Fn(&str) -> Result<(), String> + Send + Sync + 'static) {
    let _ = RELOAD.set(Box::new(f));
}

/// Replaces the log filter (`info`, `magnetar_broker=debug,warn`, …).
pub fn set_filter(filter: &str) -> Result<(), String> {
    match RELOAD.get() {
        Some(f) => f(filter),
        None => Err("this process cannot change its log level".into()),
    }
}
