//! CONNECT / CONNECTED and keep-alive.

use magnetar_proto::frame::base;
use magnetar_proto::pulsar::{
    base_command::Type, BaseCommand, CommandConnect, CommandConnected, CommandError, CommandPing,
    CommandPong, ServerError,
};
use magnetar_proto::token;

use super::connection::Conn;
use crate::PROTOCOL_VERSION;

/// Whether CONNECT carries what the broker asks: with tokens on, a token
/// (method `token`) that the broker's key signed and that has not expired;
/// the role it names.
fn authenticate(conn: &Conn, c: &CommandConnect) -> Result<Option<String>, String> {
    let Some(key) = &conn.ctx.auth else {
        return Ok(None);
    };
    match c.auth_method_name.as_deref() {
        Some(token::METHOD) => {}
        Some(other) => {
            return Err(format!(
                "authentication method {other:?} is not enabled (token is)"
            ))
        }
        None => return Err("authentication required: connect with a token".into()),
    }
    let data = c.auth_data.as_deref().unwrap_or_default();
    let text = std::str::from_utf8(data).map_err(|_| "the token is not UTF-8".to_string())?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    key.verify(text, now)
        .map(|claims| Some(claims.subject))
        .map_err(|e| e.to_string())
}

pub async fn connect(conn: &mut Conn, c: Option<CommandConnect>) -> bool {
    let Some(c) = c else { return false };
    match authenticate(conn, &c) {
        Ok(role) => conn.role = role,
        Err(why) => {
            tracing::warn!(peer = %conn.peer, client = %c.client_version, reason = %why, "authentication failed; closing");
            let mut r = base(Type::Error);
            r.error = Some(CommandError {
                request_id: u64::MAX,
                error: ServerError::AuthenticationError as i32,
                message: why,
            });
            conn.shared.send(&r).await;
            conn.refused = true;
            return true;
        }
    }
    let version = c.protocol_version.unwrap_or(0).min(PROTOCOL_VERSION);
    conn.version = version;
    let mut r = base(Type::Connected);
    r.connected = Some(CommandConnected {
        server_version: format!("Magnetar {}", env!("CARGO_PKG_VERSION")),
        protocol_version: Some(version),
        max_message_size: Some(conn.ctx.limits.max_message_bytes as i32),
        feature_flags: None,
    });
    conn.shared.send(&r).await;
    tracing::debug!(peer = %conn.peer, client = %c.client_version, version, role = ?conn.role, "connected");
    true
}

pub async fn pong(conn: &Conn) -> bool {
    let mut r = base(Type::Pong);
    r.pong = Some(CommandPong {});
    conn.shared.send(&r).await;
    true
}

pub fn ping() -> BaseCommand {
    let mut c = base(Type::Ping);
    c.ping = Some(CommandPing {});
    c
}
