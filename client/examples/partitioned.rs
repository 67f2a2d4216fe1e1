//! A partitioned topic: the producer routes each key to one partition (as
//! the Java client would), the consumer reads every partition as one
//! stream.
//!
//!     cargo run -p magnetar-client --example partitioned -- [SERVICE_URL] [TOPIC]
//!
//! The topic must be partitioned first, e.g. with the admin REST API:
//! `curl -X PUT -H 'content-type: application/json' -d 4
//!  http://127.0.0.1:8080/admin/v2/persistent/public/default/example-partitioned/partitions`

use std::collections::BTreeMap;
use std::time::Duration;

use magnetar_client::{Client, HashingScheme, InitialPosition, OutgoingMessage};

#[tokio::main]
async fn main() -> Result<(), magnetar_client::Error> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "pulsar://127.0.0.1:6650".into());
    let topic = args
        .next()
        .unwrap_or_else(|| "persistent://public/default/example-partitioned".into());

    let client = Client::builder(url).build().await?;
    let mut consumer = client
        .consumer()
        .topic(&topic)
        .subscription("example-partitioned")
        .initial_position(InitialPosition::Earliest)
        .subscribe()
        .await?;
    let producer = client
        .producer(&topic)
        .hashing_scheme(HashingScheme::JavaStringHash)
        .create()
        .await?;
    println!("{topic} has {} partitions", producer.partitions());
    for i in 0..40 {
        let mut msg = OutgoingMessage::from(format!("event {i}"));
        msg.key = Some(format!("device-{}", i % 8));
        producer.send(msg).await?;
    }
    producer.close().await?;
    let mut by_partition: BTreeMap<i32, usize> = BTreeMap::new();
    while let Some(msg) = consumer.receive_timeout(Duration::from_secs(2)).await? {
        *by_partition.entry(msg.id.partition).or_default() += 1;
        consumer.ack(&msg)?;
    }
    println!("messages per partition: {by_partition:?}");
    consumer.close().await
}
