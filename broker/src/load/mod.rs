//! Load: what each broker reports, and the load manager that balances
//! bundles between brokers.

pub mod report;
