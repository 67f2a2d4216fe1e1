//! A producer that outruns the bookies is slowed by back-pressure, not by
//! the broker's memory: with the bookie stopped (SIGSTOP), a raw Pulsar
//! client writing 64 KiB SENDs as fast as it can finds the broker's socket
//! no longer read once the connection's pending-send limit is reached; the
//! broker's resident memory stays put; once the bookie resumes, every send
//! the broker took is acknowledged.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::time::{Duration, Instant};

use bytes::BytesMut;
use magnetar_proto::frame::{self, base, encode_command, encode_payload_command};
use magnetar_proto::pulsar::{
    base_command::Type, CommandConnect, CommandProducer, CommandSend, MessageMetadata,
};
use magnetar_proto::Payload;
use magnetar_tests::{free_port_range, init_logs, LocalCluster};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMIT_BYTES: usize = 8 << 20;
const MESSAGE_BYTES: usize = 64 << 10;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn pid_of(cluster: &LocalCluster, member: &str) -> u32 {
    std::fs::read_to_string(cluster.dir.join(member).join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Reads frames until `pred` holds for one; returns how many frames came.
async fn read_until(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    mut pred: impl FnMut(&magnetar_proto::pulsar::BaseCommand) -> bool,
) {
    loop {
        while let Some(f) = frame::decode(buf, 16 << 20).unwrap() {
            if pred(&f.command) {
                return;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(30), stream.read_buf(buf))
            .await
            .expect("broker answers")
            .unwrap();
        assert!(n > 0, "broker closed the connection");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_faster_than_the_bookies_is_held_back_not_buffered() {
    init_logs();
    let tmp = tempfile::tempdir().unwrap();
    let cluster = LocalCluster {
        dir: tmp.path().join("lc"),
        ports: [free_port_range(1), free_port_range(1), free_port_range(1)],
        http_port: free_port_range(4),
        node_http_ports: [free_port_range(4), free_port_range(4)],
    };
    cluster.run(&["up", "--metadata", "1", "--bookies", "1", "--brokers", "1"]);
    // A smaller pending-send limit than the default, so the test is quick.
    cluster.run(&["kill", "broker-1", "--signal", "TERM"]);
    let config = cluster.dir.join("broker-1/config.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "[connection]\nmax_pending_send_bytes = {LIMIT_BYTES}\n"
    ));
    std::fs::write(&config, text).unwrap();
    cluster.run(&["start", "broker-1"]);
    let addr = format!("127.0.0.1:{}", cluster.ports[2]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut stream = loop {
        match TcpStream::connect(&addr).await {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("broker does not listen: {e}"),
        }
    };
    let mut buf = BytesMut::new();
    let mut out = BytesMut::new();
    let mut connect = base(Type::Connect);
    connect.connect = Some(CommandConnect {
        client_version: "backpressure-test".into(),
        protocol_version: Some(12),
        ..Default::default()
    });
    encode_command(&connect, &mut out);
    let mut producer = base(Type::Producer);
    producer.producer = Some(CommandProducer {
        topic: "persistent://public/default/backpressure".into(),
        producer_id: 1,
        request_id: 1,
        ..Default::default()
    });
    encode_command(&producer, &mut out);
    stream.write_all(&out).await.unwrap();
    read_until(&mut stream, &mut buf, |c| c.producer_success.is_some()).await;

    // One message first, so the topic's ledger holds an entry and is warm.
    let send_frame = |seq: u64| {
        let md = MessageMetadata {
            producer_name: "bp".into(),
            sequence_id: seq,
            publish_time: 1,
            ..Default::default()
        };
        let pl = Payload::build(md, &vec![7u8; MESSAGE_BYTES]);
        let mut cmd = base(Type::Send);
        cmd.send = Some(CommandSend {
            producer_id: 1,
            sequence_id: seq,
            num_messages: Some(1),
            ..Default::default()
        });
        let mut b = BytesMut::new();
        encode_payload_command(&cmd, &pl.headers_and_payload, &mut b);
        b.freeze()
    };
    stream.write_all(&send_frame(0)).await.unwrap();
    read_until(&mut stream, &mut buf, |c| c.send_receipt.is_some()).await;

    let broker = pid_of(&cluster, "broker-1");
    let rss_before = rss_kib(broker);
    cluster.run(&["kill", "bookie-1", "--signal", "STOP"]);
    // Write as fast as the broker takes it, for 2 s (less than the 3 s add
    // timeout after which the writer gives up on the bookie).
    let frame_bytes = send_frame(1).len();
    let mut written = 0usize;
    let mut seq = 1u64;
    let mut current = send_frame(seq);
    let mut off = 0usize;
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(r) = tokio::time::timeout_at(until, stream.write(&current[off..])).await {
        let n = r.unwrap();
        written += n;
        off += n;
        if off == current.len() {
            seq += 1;
            current = send_frame(seq);
            off = 0;
        }
    }
    let rss_during = rss_kib(broker);
    println!(
        "wrote {written} bytes ({} sends) in 2 s with the bookie stopped; broker RSS {rss_before} -> {rss_during} KiB",
        written / frame_bytes
    );
    // The broker took up to its limit, plus what the two sockets buffer.
    assert!(
        written >= LIMIT_BYTES / 2,
        "the broker took sends: {written}"
    );
    assert!(
        written < LIMIT_BYTES + (24 << 20),
        "the broker kept reading past its limit: {written} bytes"
    );
    assert!(
        rss_during < rss_before + 64 * 1024,
        "broker memory grew with the backlog: {rss_before} -> {rss_during} KiB"
    );

    cluster.run(&["kill", "bookie-1", "--signal", "CONT"]);
    // Finish the frame being written, then every send gets an answer.
    stream.write_all(&current[off..]).await.unwrap();
    let sent = seq;
    let mut answered = std::collections::BTreeSet::new();
    read_until(&mut stream, &mut buf, |c| {
        if let Some(r) = &c.send_receipt {
            answered.insert(r.sequence_id);
        }
        if let Some(e) = &c.send_error {
            answered.insert(e.sequence_id);
        }
        answered.len() as u64 == sent
    })
    .await;
    assert_eq!(
        answered.len() as u64,
        sent,
        "every send the broker took was answered"
    );
}
