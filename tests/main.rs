//! Integration suite: the `outbox-relay` binary against real PostgreSQL and a real
//! Kafka-protocol broker and RabbitMQ on loopback (`scripts/services.sh` starts them).
//!
//! Every test owns its outbox table and topics, so tests run in parallel.

mod cli;
mod cloudevents;
mod faults;
mod inbox;
mod layouts;
mod operability;
mod relay_kafka;
mod relay_rabbitmq;
mod scenarios;
mod security;
mod support;
