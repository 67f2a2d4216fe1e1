//! Command builders the handlers share (the generic ones live in
//! `magnetar_proto::commands`; positions convert in `cursor::Position`).

use magnetar_proto::frame::base;
use magnetar_proto::pulsar::{
    base_command::Type, BaseCommand, CommandSendError, CommandSendReceipt, ServerError,
};

use crate::managed_ledger::cursor::Position;

pub fn send_receipt(producer_id: u64, sequence_id: u64, highest: u64, p: Position) -> BaseCommand {
    let mut r = base(Type::SendReceipt);
    r.send_receipt = Some(CommandSendReceipt {
        producer_id,
        sequence_id,
        message_id: Some(p.message_id()),
        highest_sequence_id: Some(highest),
    });
    r
}

pub fn send_error(
    producer_id: u64,
    sequence_id: u64,
    code: ServerError,
    message: String,
) -> BaseCommand {
    let mut r = base(Type::SendError);
    r.send_error = Some(CommandSendError {
        producer_id,
        sequence_id,
        error: code as i32,
        message,
    });
    r
}
