//! CONNECT / CONNECTED and keep-alive.

use magnetar_proto::frame::base;
use magnetar_proto::pulsar::{
    base_command::Type, BaseCommand, CommandConnect, CommandConnected, CommandPing, CommandPong,
};

use super::connection::Conn;
use crate::PROTOCOL_VERSION;

pub async fn connect(conn: &mut Conn, c: Option<CommandConnect>) -> bool {
    let Some(c) = c else { return false };
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
    tracing::debug!(peer = %conn.peer, client = %c.client_version, version, "connected");
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
