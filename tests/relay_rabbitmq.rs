//! The RabbitMQ sink end to end: the shared scenarios against the real RabbitMQ, plus
//! RabbitMQ's own failure cases (no binding, broker restart, forced close, oversized message).

use crate::scenarios;
use crate::support::Broker;

#[tokio::test(flavor = "multi_thread")]
async fn committed_events_arrive_as_contracted_and_rolled_back_ones_never() {
    scenarios::committed_events_arrive_as_contracted_and_rolled_back_ones_never(Broker::RabbitMq)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn events_of_an_aggregate_arrive_in_id_order() {
    scenarios::events_of_an_aggregate_arrive_in_id_order(Broker::RabbitMq).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn listen_wakes_the_relay_without_waiting_for_the_poll() {
    scenarios::listen_wakes_the_relay_without_waiting_for_the_poll(Broker::RabbitMq).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn polling_alone_publishes_without_listen() {
    scenarios::polling_alone_publishes_without_listen(Broker::RabbitMq).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn runs_against_a_table_the_application_created() {
    scenarios::runs_against_a_table_the_application_created(Broker::RabbitMq).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigkill_mid_drain_then_restart_loses_nothing() {
    scenarios::sigkill_mid_drain_then_restart_loses_nothing(Broker::RabbitMq).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_settles_the_in_flight_batch_and_exits_zero() {
    scenarios::sigterm_settles_the_in_flight_batch_and_exits_zero(Broker::RabbitMq).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_outage_does_not_use_up_attempts() {
    scenarios::a_broker_outage_does_not_use_up_attempts(Broker::RabbitMq).await;
}
