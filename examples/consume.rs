//! Prints what the relay published to a Kafka topic: key, headers and value, one message per
//! line. Used by `scripts/demo.sh`.
//!
//! `cargo run --release --example consume -- <brokers> <topic>`

use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

fn main() {
    let mut args = std::env::args().skip(1);
    let brokers = args.next().unwrap_or_else(|| "127.0.0.1:9092".to_owned());
    let topic = args
        .next()
        .unwrap_or_else(|| "outbox.event.order".to_owned());
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "outbox-relay-demo")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    // Wait for the topic (the relay creates it with its first event).
    let partitions = loop {
        match consumer.fetch_metadata(Some(&topic), Duration::from_secs(5)) {
            Ok(metadata) if !metadata.topics()[0].partitions().is_empty() => {
                break metadata.topics()[0].partitions().len() as i32;
            }
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    };
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        assignment
            .add_partition_offset(&topic, partition, Offset::Beginning)
            .expect("assign");
    }
    consumer.assign(&assignment).expect("assign");
    eprintln!("consuming {topic} from {brokers} (Ctrl-C to stop)");
    loop {
        let Some(message) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let message = match message {
            Ok(message) => message,
            Err(err) => {
                eprintln!("consume error: {err}");
                continue;
            }
        };
        let mut headers = Vec::new();
        if let Some(h) = message.headers() {
            for header in h.iter() {
                let value = String::from_utf8_lossy(header.value.unwrap_or_default());
                headers.push(format!("{}={value}", header.key));
            }
        }
        println!(
            "{topic}[{}]@{} key={} headers=[{}] value={}",
            message.partition(),
            message.offset(),
            String::from_utf8_lossy(message.key().unwrap_or_default()),
            headers.join(" "),
            String::from_utf8_lossy(message.payload().unwrap_or_default())
        );
    }
}
