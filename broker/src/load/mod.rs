//! Load: what each broker reports, and the load manager that balances
//! bundles between brokers.

pub mod commands;
pub mod manager;
pub mod report;
