//! Typed producers and consumers: a serde type sent as Pulsar JSON, its
//! schema registered with the topic (so other clients — Java's, Python's
//! `JsonSchema` — read and write the same records).
//!
//!     cargo run -p magnetar-client --example typed_json -- [SERVICE_URL] [TOPIC] [COUNT]

use std::time::Duration;

use magnetar_client::{Client, InitialPosition, JsonSchema};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: Option<i64>,
    item: Option<String>,
}

impl JsonSchema for Order {
    fn definition() -> String {
        // What Python's `class Order(Record): id = Long(); item = String()`
        // registers: nullable fields.
        r#"{"type":"record","name":"Order","fields":[
            {"name":"id","type":["null","long"]},
            {"name":"item","type":["null","string"]}]}"#
            .into()
    }
}

#[tokio::main]
async fn main() -> Result<(), magnetar_client::Error> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "pulsar://127.0.0.1:6650".into());
    let topic = args.next().unwrap_or_else(|| "example-typed".into());
    let count: i64 = args.next().and_then(|n| n.parse().ok()).unwrap_or(10);

    let client = Client::builder(url).build().await?;
    let mut consumer = client
        .consumer()
        .topic(&topic)
        .subscription("example-typed")
        .initial_position(InitialPosition::Earliest)
        .subscribe_typed::<Order>()
        .await?;
    let producer = client.producer(&topic).create_typed::<Order>().await?;
    for id in 0..count {
        producer
            .send(&Order {
                id: Some(id),
                item: Some(format!("item-{id}")),
            })?
            .await?;
    }
    producer.close().await?;
    // Everything on the topic: what other clients wrote too.
    let mut read = 0;
    while let Some(order) = consumer.receive_timeout(Duration::from_secs(2)).await? {
        println!("order {:?}: {:?}", order.value.id, order.value.item);
        consumer.ack(&order)?;
        read += 1;
    }
    println!("read {read} orders");
    consumer.close().await
}
