//! Transport security: the relay speaking TLS to PostgreSQL (a private TLS-only server) and to
//! each broker (a TLS front end, `socat`, in front of the real broker), with a test CA and
//! client certificates.

use crate::support::postgres::PrivatePostgres;
use crate::support::tls::{Certs, TlsKafka, TlsProxy};
use crate::support::{Broker, Outbox, WAIT, run_binary};

#[tokio::test(flavor = "multi_thread")]
async fn connects_to_postgres_over_tls_with_verify_full() {
    // GIVEN a PostgreSQL that accepts only TLS connections, with a certificate from a test CA
    let certs = tokio::task::spawn_blocking(Certs::generate).await.unwrap();
    let server = PrivatePostgres::start(Some(&certs)).await;
    let mut outbox = Outbox::unmigrated().await;

    // WHEN migrate connects with sslmode=verify-full and the right CA, THEN it succeeds (the
    // server rejects anything but TLS), and `check` reads the table over TLS
    outbox.database_url = server.tls_url(&certs, "ca.crt");
    let migrated = outbox.command(&["migrate"]);
    assert!(
        migrated.status.success() && migrated.stdout.contains("applied migration(s)"),
        "{migrated:?}"
    );
    let check = outbox.command(&["check"]);
    assert!(
        check.stdout.contains("all 15 required columns present"),
        "{check:?}"
    );

    // AND a certificate from another CA is refused
    outbox.database_url = server.tls_url(&certs, "other-ca.crt");
    let out = outbox.command(&["migrate"]);
    assert_eq!(out.code(), Some(1), "{out:?}");
}

fn toml_path(path: std::path::PathBuf) -> String {
    format!("\"{}\"", path.display())
}

#[tokio::test(flavor = "multi_thread")]
async fn publishes_to_rabbitmq_over_amqps_with_a_client_certificate() {
    // GIVEN RabbitMQ reachable only through TLS that demands a client certificate from the
    // test CA, and a relay configured with that CA, its certificate and its key
    let certs = tokio::task::spawn_blocking(Certs::generate).await.unwrap();
    let proxy = TlsProxy::start(&certs, 5672, true).await;
    let mut outbox = Outbox::for_broker(Broker::RabbitMq).await;
    outbox.rabbitmq.insert(
        "url",
        format!("\"amqps://guest:guest@localhost:{}/%2f\"", proxy.port),
    );
    outbox
        .rabbitmq_tls
        .insert("ca_file", toml_path(certs.path("ca.crt")));
    outbox
        .rabbitmq_tls
        .insert("cert_file", toml_path(certs.path("client.crt")));
    outbox
        .rabbitmq_tls
        .insert("key_file", toml_path(certs.path("client.key")));
    let mut reader = outbox.reader("order", 1).await;

    // WHEN `check` probes the broker and the relay publishes five events
    let check = outbox.command(&["check"]);
    assert!(
        check.status.success() && check.stdout.contains("rabbitmq: reachable"),
        "{check:?}"
    );
    let _relay = outbox.start();
    outbox.insert("order", "o-1", 0..5).await;

    // THEN they arrive in order and are marked
    let got = reader.read_distinct(5, WAIT).await;
    let seqs: Vec<i64> = got.iter().map(|r| r.seq()).collect();
    assert_eq!(seqs, vec![0, 1, 2, 3, 4]);
    outbox.wait_all_published(WAIT).await;

    // AND without the client certificate, or trusting another CA, the broker is unreachable
    outbox.rabbitmq_tls.remove("cert_file");
    outbox.rabbitmq_tls.remove("key_file");
    let no_cert = outbox.command(&["check"]);
    assert_eq!(no_cert.code(), Some(1), "{no_cert:?}");
    outbox
        .rabbitmq_tls
        .insert("ca_file", toml_path(certs.path("other-ca.crt")));
    let other_ca = outbox.command(&["check"]);
    assert_eq!(other_ca.code(), Some(1), "{other_ca:?}");
    assert!(
        !other_ca.stderr.contains("guest:guest"),
        "the URL's password is never printed: {other_ca:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn publishes_to_kafka_over_ssl_with_a_client_certificate() {
    // GIVEN a Kafka-protocol broker reachable (bootstrap and produce) only through TLS that
    // demands a client certificate, and a relay with security.protocol = "ssl"
    let certs = tokio::task::spawn_blocking(Certs::generate).await.unwrap();
    let kafka = TlsKafka::start(&certs, true).await;
    let mut outbox = Outbox::new().await;
    outbox
        .kafka
        .insert("brokers", format!("\"{}\"", kafka.brokers()));
    let ssl = [
        ("security.protocol", "ssl".to_owned()),
        (
            "ssl.ca.location",
            certs.path("ca.crt").display().to_string(),
        ),
        (
            "ssl.certificate.location",
            certs.path("client.crt").display().to_string(),
        ),
        (
            "ssl.key.location",
            certs.path("client.key").display().to_string(),
        ),
    ];
    for (key, value) in &ssl {
        outbox.kafka_properties.insert(key, format!("\"{value}\""));
    }

    // WHEN `check` probes the broker and the relay publishes five events
    let check = outbox.command(&["check"]);
    assert!(
        check.status.success() && check.stdout.contains("kafka: reachable"),
        "{check:?}"
    );
    let _relay = outbox.start();
    outbox.insert("order", "o-1", 0..5).await;
    outbox.wait_all_published(WAIT).await;

    // THEN a TLS consumer reads them from the broker, in order
    let topic = outbox.topic("order");
    let mut client = rdkafka::ClientConfig::new();
    client.set("bootstrap.servers", kafka.brokers());
    for (key, value) in &ssl {
        client.set(*key, value);
    }
    let seqs = tokio::task::spawn_blocking(move || {
        let mut reader = crate::support::kafka::TopicReader::with_client(&topic, client);
        reader
            .read_distinct(5, WAIT)
            .iter()
            .map(|r| r.seq())
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert_eq!(seqs, vec![0, 1, 2, 3, 4]);

    // AND trusting another CA, the broker is unreachable
    outbox.kafka_properties.insert(
        "ssl.ca.location",
        format!("\"{}\"", certs.path("other-ca.crt").display()),
    );
    let other_ca = run_binary(&outbox.config_file(), &["check"], &[]);
    assert_eq!(other_ca.code(), Some(1), "{other_ca:?}");
}
