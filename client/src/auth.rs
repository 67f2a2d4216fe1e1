//! Authentication: what a client sends in CONNECT. [`Token`] is Pulsar's
//! `token` method (a JWT the cluster's key signed, as `magnetar tokens
//! create` or `pulsar tokens create` make); other methods plug in through
//! [`Authentication`].

use std::sync::Arc;

use crate::Error;

/// A way to authenticate: the CONNECT `auth_method_name` and the data to
/// send with it, asked for on every new connection (so a provider may
/// refresh what it returns).
pub trait Authentication: Send + Sync {
    /// The method's name as brokers know it (`token`, …).
    fn method_name(&self) -> &str;
    /// The credentials to send now.
    fn auth_data(&self) -> Result<Vec<u8>, Error>;
}

/// Pulsar's token authentication.
///
/// ```
/// use magnetar_client::auth::{Authentication, Token};
///
/// let fixed = Token::new("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhcHAifQ.c2ln");
/// assert_eq!(fixed.method_name(), "token");
/// // Or read anew for every connection (a token file that is rotated):
/// let rotating = Token::from_fn(|| Ok(std::env::var("APP_TOKEN").unwrap_or_default()));
/// # let _ = rotating;
/// ```
pub struct Token {
    source: Box<dyn Fn() -> Result<String, Error> + Send + Sync>,
}

impl Token {
    /// A fixed token.
    pub fn new(token: impl Into<String>) -> Token {
        let token = token.into();
        Token {
            source: Box::new(move || Ok(token.clone())),
        }
    }

    /// A token produced anew for each connection.
    pub fn from_fn(f: impl Fn() -> Result<String, Error> + Send + Sync + 'static) -> Token {
        Token {
            source: Box::new(f),
        }
    }
}

impl Authentication for Token {
    fn method_name(&self) -> &str {
        "token"
    }

    fn auth_data(&self) -> Result<Vec<u8>, Error> {
        (self.source)().map(|t| t.trim().as_bytes().to_vec())
    }
}

/// What a client authenticates with, if anything.
pub(crate) type Auth = Option<Arc<dyn Authentication>>;
