//! Workers sharing a subscription by key: every message of a key goes to
//! the same worker, in order, while keys spread over the workers.
//!
//!     cargo run -p magnetar-client --example key_shared_workers -- [SERVICE_URL] [TOPIC] [COUNT]

use std::collections::HashMap;
use std::time::Duration;

use magnetar_client::{Client, InitialPosition, OutgoingMessage, SubscriptionType};

#[tokio::main]
async fn main() -> Result<(), magnetar_client::Error> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "pulsar://127.0.0.1:6650".into());
    let topic = args.next().unwrap_or_else(|| "example-work".into());
    let count: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(200);

    let client = Client::builder(url).build().await?;
    let mut workers = Vec::new();
    for w in 0..3 {
        let mut consumer = client
            .consumer()
            .topic(&topic)
            .subscription("workers")
            .subscription_type(SubscriptionType::KeyShared)
            .initial_position(InitialPosition::Earliest)
            .consumer_name(format!("worker-{w}"))
            .subscribe()
            .await?;
        workers.push(tokio::spawn(async move {
            let mut last: HashMap<String, usize> = HashMap::new();
            let mut handled = 0;
            // Until the stream stays quiet for a while.
            while let Some(msg) = consumer.receive_timeout(Duration::from_secs(2)).await? {
                let key = msg.key.clone().unwrap_or_default();
                let seq: usize = String::from_utf8_lossy(&msg.payload).parse().unwrap_or(0);
                if let Some(prev) = last.insert(key.clone(), seq) {
                    assert!(prev < seq, "{key} out of order");
                }
                handled += 1;
                consumer.ack(&msg)?;
            }
            consumer.close().await?;
            Ok::<_, magnetar_client::Error>((w, handled, last.len()))
        }));
    }
    let producer = client.producer(&topic).create().await?;
    let mut receipts = Vec::new();
    for i in 0..count {
        let mut msg = OutgoingMessage::from(i.to_string());
        msg.key = Some(format!("account-{}", i % 12));
        receipts.push(producer.send_async(msg));
    }
    for r in receipts {
        r.await?;
    }
    producer.close().await?;
    let mut total = 0;
    for w in workers {
        let (w, handled, keys) = w
            .await
            .map_err(|e| magnetar_client::Error::Protocol(e.to_string()))??;
        println!("worker-{w}: {handled} messages of {keys} keys, each key in order");
        total += handled;
    }
    println!("handled {total} of {count}");
    Ok(())
}
