//! Replays a topic from its first message with a reader (nothing is stored
//! on the broker about how far it read), stopping once it is caught up.
//!
//!     cargo run -p magnetar-client --example reader_replay -- [SERVICE_URL] [TOPIC]

use std::time::Duration;

use magnetar_client::{Client, MessageId};

#[tokio::main]
async fn main() -> Result<(), magnetar_client::Error> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "pulsar://127.0.0.1:6650".into());
    let topic = args.next().unwrap_or_else(|| "example-orders".into());

    let client = Client::builder(url).build().await?;
    let mut reader = client
        .reader(&topic)
        .start_message_id(MessageId::EARLIEST)
        .create()
        .await?;
    let mut replayed = 0;
    let mut last = None;
    while reader.has_message_available().await? {
        match reader.next_timeout(Duration::from_secs(5)).await? {
            Some(msg) => {
                replayed += 1;
                last = Some(msg.id);
            }
            None => break,
        }
    }
    println!("replayed {replayed} messages of {topic}; last {last:?}");
    reader.close().await
}
