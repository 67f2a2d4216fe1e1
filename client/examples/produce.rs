//! Sends messages, batched and LZ4-compressed, and waits for every receipt.
//!
//!     cargo run -p magnetar-client --example produce -- [SERVICE_URL] [TOPIC] [COUNT]

use std::time::Duration;

use magnetar_client::{Client, Compression, OutgoingMessage};

#[tokio::main]
async fn main() -> Result<(), magnetar_client::Error> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "pulsar://127.0.0.1:6650".into());
    let topic = args.next().unwrap_or_else(|| "example-orders".into());
    let count: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(100);

    let client = Client::builder(url).build().await?;
    let producer = client
        .producer(&topic)
        .batching(500, 128 * 1024, Duration::from_millis(5))
        .compression(Compression::Lz4)
        .create()
        .await?;
    let mut receipts = Vec::with_capacity(count);
    for i in 0..count {
        let mut msg = OutgoingMessage::from(format!("order {i}"));
        msg.key = Some(format!("customer-{}", i % 10));
        msg.properties.insert("source".into(), "example".into());
        receipts.push(producer.send_async(msg));
    }
    producer.flush();
    for r in receipts {
        r.await?;
    }
    println!("sent {count} messages to {topic}");
    producer.close().await
}
