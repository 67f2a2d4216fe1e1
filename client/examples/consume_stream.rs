//! Reads a subscription as a `futures::Stream`, acknowledging each message.
//!
//!     cargo run -p magnetar-client --example consume_stream -- [SERVICE_URL] [TOPIC] [COUNT]

use futures::StreamExt;
use magnetar_client::{Client, InitialPosition, SubscriptionType};

#[tokio::main]
async fn main() -> Result<(), magnetar_client::Error> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "pulsar://127.0.0.1:6650".into());
    let topic = args.next().unwrap_or_else(|| "example-orders".into());
    let count: usize = args.next().and_then(|n| n.parse().ok()).unwrap_or(100);

    let client = Client::builder(url).build().await?;
    let mut consumer = client
        .consumer()
        .topic(&topic)
        .subscription("example-stream")
        .subscription_type(SubscriptionType::Shared)
        .initial_position(InitialPosition::Earliest)
        .subscribe()
        .await?;
    let mut seen = 0;
    while let Some(msg) = consumer.next().await {
        let msg = msg?;
        seen += 1;
        if seen <= 3 {
            println!(
                "{} key={:?} {}",
                msg.id,
                msg.key,
                String::from_utf8_lossy(&msg.payload)
            );
        }
        consumer.ack(&msg)?;
        if seen == count {
            break;
        }
    }
    println!("received {seen} messages from {topic}");
    consumer.close().await
}
