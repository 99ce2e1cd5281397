//! The command-line contract: exit codes, config errors that name the key, `migrate`, `check`.

use std::time::Duration;

use crate::support::{Outbox, RelayProcess, run_binary, unique};

const VALID: &str = r#"
[database]
url = "postgres://postgres@127.0.0.1:5432/outbox_relay_test"
table = "outbox"
[relay]
poll_interval = "1s"
[sink]
kind = "kafka"
[sink.kafka]
brokers = "127.0.0.1:9092"
"#;

fn with_config(text: &str, env: &[(&str, &str)], args: &[&str]) -> crate::support::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, text).unwrap();
    run_binary(&path, args, env)
}

fn assert_config_error(text: &str, env: &[(&str, &str)], key: &str) {
    for command in ["run", "check", "migrate"] {
        let out = with_config(text, env, &[command]);
        assert_eq!(out.code(), Some(2), "`{command}` must exit 2: {out:?}");
        assert!(
            out.stderr.contains(key),
            "`{command}` error must name `{key}`: {}",
            out.stderr
        );
    }
}

#[test]
fn invalid_configs_exit_2_naming_the_key() {
    // GIVEN configs that are each wrong in one place, WHEN any command loads them,
    // THEN it exits 2 before connecting, naming the key.
    assert_config_error(
        &VALID.replace("[relay]", "[relay]\nbatchsize = 10"),
        &[],
        "batchsize",
    );
    assert_config_error(
        &VALID.replace("poll_interval = \"1s\"", "poll_interval = \"soon\""),
        &[],
        "relay.poll_interval",
    );
    assert_config_error(
        &VALID.replace(
            "url = \"postgres://postgres@127.0.0.1:5432/outbox_relay_test\"\n",
            "",
        ),
        &[],
        "url",
    );
    assert_config_error(
        &VALID.replace("table = \"outbox\"", "table = \"Bad-Name\""),
        &[],
        "database.table",
    );
    assert_config_error(
        &VALID.replace("[relay]", "[relay]\nbatch_size = 0"),
        &[],
        "relay.batch_size",
    );
    assert_config_error(
        &format!("{VALID}\n[sink.kafka.properties]\nenable.idempotence = false\n"),
        &[],
        "enable.idempotence",
    );
    assert_config_error(
        &format!("{VALID}\n[sink.kafka.properties]\n\"no.such.property\" = \"1\"\n"),
        &[],
        "no.such.property",
    );
    assert_config_error(
        &format!("{VALID}\n[sink.kafka.properties]\n\"plugin.library.paths\" = \"/tmp/x.so\"\n"),
        &[],
        "plugin.library.paths",
    );
    assert_config_error(
        &format!(
            "{VALID}\n[sink.kafka.properties]\n\"enable.ssl.certificate.verification\" = \"false\"\n"
        ),
        &[],
        "sink.kafka.unsafe",
    );
}

#[test]
fn environment_overrides_file_keys() {
    // GIVEN a valid file and an environment override with a bad value,
    // WHEN the relay loads it, THEN the override is applied (and rejected, naming the key).
    assert_config_error(
        VALID,
        &[("OUTBOX_RELAY__RELAY__BATCH_SIZE", "0")],
        "relay.batch_size",
    );
    assert_config_error(
        VALID,
        &[("OUTBOX_RELAY__DATABASE__TABLE", "no-good")],
        "database.table",
    );
}

#[test]
fn missing_config_file_is_a_usage_error() {
    let out = run_binary(
        std::path::Path::new("/nonexistent/relay.toml"),
        &["check"],
        &[],
    );
    assert_eq!(out.code(), Some(2), "{out:?}");
    let no_flag = std::process::Command::new(crate::support::binary())
        .arg("run")
        .env_remove("OUTBOX_RELAY_CONFIG")
        .output()
        .unwrap();
    assert_eq!(no_flag.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&no_flag.stderr).contains("--config"));
}

#[test]
fn secrets_in_the_url_are_never_printed() {
    // GIVEN a database URL with a password and an unreachable host,
    // WHEN check fails to connect, THEN the output names host and port but not the password.
    let config = VALID.replace(
        "postgres://postgres@127.0.0.1:5432/",
        "postgres://postgres:S3ntinel-pw@127.0.0.1:1/",
    );
    let out = with_config(&config, &[], &["check"]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("127.0.0.1:1"), "{}", out.stderr);
    assert!(!out.stderr.contains("S3ntinel-pw") && !out.stdout.contains("S3ntinel-pw"));
}

#[tokio::test]
async fn migrate_twice_is_a_no_op() {
    // GIVEN a fresh table name
    let outbox = Outbox::unmigrated().await;
    // WHEN migrate runs twice (the second time concurrently with a third)
    let first = outbox.migrate().success();
    assert!(first.stdout.contains("applied migration(s) 1"), "{first:?}");
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| outbox.migrate());
        let b = s.spawn(|| outbox.migrate());
        (a.join().unwrap(), b.join().unwrap())
    });
    // THEN the later runs change nothing and report the table up to date
    for out in [a.success(), b.success()] {
        assert!(out.stdout.contains("up to date"), "{out:?}");
    }
    let versions: i64 =
        sqlx::query_scalar("select count(*) from outbox_relay_migrations where table_name = $1")
            .bind(&outbox.table)
            .fetch_one(&outbox.pool)
            .await
            .unwrap();
    assert_eq!(versions, 9, "one row per migration");
    // AND check is happy with the result
    let check = outbox.command(&["check"]).success();
    assert!(
        check.stdout.contains("all 15 required columns present"),
        "{check:?}"
    );
    assert!(
        check.stdout.contains("notify trigger: installed"),
        "{check:?}"
    );
}

#[tokio::test]
async fn event_ids_default_to_time_ordered_uuidv7_unless_the_table_has_its_own_default() {
    // GIVEN a table created by migrate
    let outbox = Outbox::unmigrated().await;
    outbox.migrate().success();
    // WHEN rows are inserted without an event id, in two transactions a few milliseconds apart
    outbox.insert("order", "o-1", 0..3).await;
    outbox.exec("select pg_sleep(0.005)").await;
    outbox.insert("order", "o-1", 3..4).await;
    // THEN each id is a UUIDv7 (RFC 9562: version 7, variant 10) whose leading 48 bits are the
    // insert's Unix time in milliseconds, so later rows sort after earlier ones
    let versions: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "select substr(event_id::text, 15, 1) || substr(event_id::text, 20, 1) from {} order by id",
        outbox.table
    )))
    .fetch_all(&outbox.pool)
    .await
    .unwrap();
    assert_eq!(versions.len(), 4);
    for v in &versions {
        assert!(
            v.starts_with('7') && "89ab".contains(&v[1..]),
            "{versions:?}"
        );
    }
    let skew_ms: f64 = outbox
        .scalar(
            "select max(abs(('x' || lpad(replace(substr(event_id::text, 1, 13), '-', ''), 16, '0'))::bit(64)::bigint
                            - extract(epoch from created_at) * 1000))::float8 from {table}",
        )
        .await;
    assert!(skew_ms < 1_000.0, "timestamp part off by {skew_ms} ms");
    let ordered: bool = outbox
        .scalar(
            "select bool_and(last.event_id > o.event_id)
             from {table} o, (select id, event_id from {table} order by id desc limit 1) last
             where o.id < last.id",
        )
        .await;
    assert!(
        ordered,
        "the later transaction's id sorts after the earlier ones"
    );

    // GIVEN a table the application created with its own event id default
    let adopted = Outbox::unmigrated().await;
    adopted
        .exec(
            "create table {table} (
                id bigint generated always as identity primary key,
                event_id uuid not null unique default gen_random_uuid(),
                aggregate_type text not null, aggregate_id text not null, event_type text not null,
                payload jsonb not null, headers jsonb not null default '{}',
                created_at timestamptz not null default now(), published_at timestamptz,
                attempts integer not null default 0, next_attempt_at timestamptz,
                last_error text, dead_lettered_at timestamptz);
             alter table {table} alter column event_id
                 set default md5(random()::text)::uuid",
        )
        .await;
    // WHEN migrate adopts it, THEN its default is left alone
    adopted.migrate().success();
    let default: String = adopted
        .scalar(
            "select pg_get_expr(d.adbin, d.adrelid) from pg_attrdef d
             join pg_attribute a on a.attrelid = d.adrelid and a.attnum = d.adnum
             where d.adrelid = '{table}'::regclass and a.attname = 'event_id'",
        )
        .await;
    assert!(default.starts_with("(md5("), "{default}");
}

#[tokio::test]
async fn migrate_creates_a_schema_qualified_table() {
    let mut outbox = Outbox::unmigrated().await;
    let schema = unique("billing");
    outbox.table = format!("{schema}.outbox");
    outbox.migrate().success();
    let check = outbox.command(&["check"]).success();
    assert!(
        check.stdout.contains(&format!("table {schema}.outbox")),
        "{check:?}"
    );
}

#[tokio::test]
async fn migrating_several_tables_of_a_new_schema_at_once_succeeds() {
    // GIVEN four tables in a schema that does not exist yet (so the schema and its migration
    // tracking table are created by whichever run comes first)
    let schema = unique("fresh");
    let mut outboxes = Vec::new();
    for i in 0..4 {
        let mut outbox = Outbox::unmigrated().await;
        outbox.table = format!("{schema}.outbox_{i}");
        outboxes.push(outbox);
    }
    // WHEN they are migrated concurrently (sidecars of four services starting together)
    let runs: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = outboxes.iter().map(|o| s.spawn(|| o.migrate())).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // THEN every run succeeds (they are serialised, not racing on `create ... if not exists`)
    for run in runs {
        assert!(
            run.status.success() && run.stdout.contains("applied migration(s)"),
            "{run:?}"
        );
    }
}

#[tokio::test]
async fn check_detects_a_missing_column() {
    // GIVEN a table the application created without `last_error`
    let outbox = Outbox::unmigrated().await;
    outbox
        .exec(
            "create table {table} (
                id bigint generated always as identity primary key,
                event_id uuid not null default gen_random_uuid(),
                aggregate_type text not null, aggregate_id text not null, event_type text not null,
                payload jsonb not null, headers jsonb not null default '{}',
                created_at timestamptz not null default now(), published_at timestamptz,
                attempts integer not null default 0, next_attempt_at timestamptz,
                dead_lettered_at timestamptz, tenant text)",
        )
        .await;
    // WHEN check runs, THEN it fails and names the column
    let out = outbox.command(&["check"]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stdout.contains("missing columns: last_error"),
        "{out:?}"
    );
    assert!(out.stdout.contains("extra columns: tenant"), "{out:?}");
}

#[tokio::test]
async fn check_reports_a_missing_table_with_the_migrate_hint() {
    let outbox = Outbox::unmigrated().await;
    let out = outbox.command(&["check"]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("outbox-relay migrate"), "{out:?}");
}

#[tokio::test]
async fn check_names_a_missing_lease_table_and_migrate_restores_it() {
    // GIVEN a migrated table whose lease table was dropped
    let outbox = Outbox::new().await;
    outbox.exec("drop table {leases}").await;
    // WHEN check runs, THEN it fails and names the lease table and the fix
    let out = outbox.command(&["check"]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    let expected = format!(
        "lease table {}_leases missing (run `outbox-relay migrate`)",
        outbox.table
    );
    assert!(out.stdout.contains(&expected), "{out:?}");
    // AND migrate (already at the newest version) creates it again, and check passes
    outbox.migrate().success();
    outbox.command(&["check"]).success();
}

#[tokio::test]
async fn relay_outlives_a_missing_table_and_starts_publishing_once_it_exists() {
    // GIVEN a relay started before its table exists
    let outbox = Outbox::unmigrated().await;
    let mut relay = outbox.start();
    relay
        .wait_for_log("outbox-relay migrate", Duration::from_secs(20))
        .await;
    // WHEN the table is migrated and an event written
    outbox.migrate().success();
    outbox.insert("order", "1", 0..3).await;
    // THEN the relay, still running, publishes it
    outbox.wait_all_published(Duration::from_secs(30)).await;
    relay.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(relay.wait_exit(Duration::from_secs(15)).await.success());
    let logs = relay.logs();
    assert_eq!(
        logs.matches("outbox-relay migrate").count(),
        1,
        "the outage is logged once: {logs}"
    );
    assert!(logs.contains("database available again"), "{logs}");
}

#[tokio::test]
async fn relay_keeps_retrying_an_unreachable_database() {
    // GIVEN a relay whose database is unreachable
    let outbox = Outbox::unmigrated().await;
    let config = std::fs::read_to_string(outbox.config_file())
        .unwrap()
        .replace("127.0.0.1:5432", "127.0.0.1:1");
    let path = outbox.dir.path().join("down.toml");
    std::fs::write(&path, config).unwrap();
    let mut relay = RelayProcess::start(path, outbox.dir.path().join("down.log"));
    // WHEN it has failed to reach the database
    relay
        .wait_for_log("database unavailable", Duration::from_secs(20))
        .await;
    // THEN it is still running, SIGTERM stops it cleanly, and the outage was logged once
    relay.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(relay.wait_exit(Duration::from_secs(15)).await.success());
    let logs = relay.logs();
    assert_eq!(
        logs.matches("database unavailable, retrying").count(),
        1,
        "{logs}"
    );
}

#[tokio::test]
async fn one_environment_variable_switches_the_broker() {
    // GIVEN a config for Kafka that also has a [broker.rabbitmq] section
    let outbox = Outbox::new().await;
    let config = outbox.config_file();
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("\"kind\" = \"kafka\"") && text.contains("[broker.rabbitmq]"));
    // WHEN OUTBOX_RELAY__BROKER__KIND=rabbitmq is set
    let out = run_binary(
        &config,
        &["check"],
        &[("OUTBOX_RELAY__BROKER__KIND", "rabbitmq")],
    );
    // THEN the relay talks to RabbitMQ instead
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("rabbitmq: reachable"), "{out:?}");
    assert!(!out.stdout.contains("kafka: reachable"), "{out:?}");
}

#[tokio::test]
async fn a_configuration_written_before_the_broker_section_was_renamed_still_works() {
    // GIVEN the same config spelled as before 0.2: [sink], [sink.kafka], [sink.rabbitmq]
    let outbox = Outbox::new().await;
    let text = std::fs::read_to_string(outbox.config_file())
        .unwrap()
        .replace("[broker", "[sink");
    assert!(text.contains("[sink]") && !text.contains("[broker"));
    // WHEN the old variable OUTBOX_RELAY__SINK__KIND=rabbitmq switches it
    let out = with_config(
        &text,
        &[("OUTBOX_RELAY__SINK__KIND", "rabbitmq")],
        &["check"],
    );
    // THEN it loads and talks to RabbitMQ, as it did
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("rabbitmq: reachable"), "{out:?}");
}

#[tokio::test]
async fn status_counts_rows_by_state() {
    // GIVEN rows in every state: published, pending, leased, retrying, parked behind a
    // retrying row of the same aggregate, and dead
    let outbox = Outbox::new().await;
    outbox.insert("order", "published", 0..2).await;
    outbox.insert("order", "pending", 0..3).await;
    outbox.insert("order", "leased", 0..1).await;
    outbox.insert("order", "retrying", 0..3).await;
    outbox.insert("order", "dead", 0..1).await;
    outbox
        .exec(
            "update {table} set published_at = now() where aggregate_id = 'published';
             insert into {leases} (claimed_at, until, ids, aggregates)
               select now(), now() + interval '1 minute', array_agg(id), array['leased']
               from {table} where aggregate_id = 'leased';
             update {table} set next_attempt_at = now() + interval '1 minute', attempts = 2,
                    last_error = 'boom'
               where aggregate_id = 'retrying' and (payload->>'seq')::int = 0;
             update {table} set dead_lettered_at = now(), last_error = 'boom'
               where aggregate_id = 'dead';",
        )
        .await;
    // WHEN status runs
    let out = outbox.command(&["status", "--json"]).success();
    // THEN it reports each state
    let json: serde_json::Value = serde_json::from_str(out.stdout.trim()).expect("JSON");
    let status = &json["status"];
    assert_eq!(status["pending"], 7, "{json}");
    assert_eq!(status["in_flight"], 1, "{json}");
    assert_eq!(status["retrying"], 1, "{json}");
    assert_eq!(status["parked"], 2, "{json}");
    assert_eq!(status["dead"], 1, "{json}");
    assert!(status["oldest_pending_age_s"].as_f64().unwrap() >= 0.0);
    // AND the text form says the same
    let text = outbox.command(&["status"]).success();
    assert!(text.stdout.contains("parked"), "{text:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn secrets_from_files_are_used_and_never_printed() {
    // GIVEN database and AMQP URLs with a sentinel password, read from files, pointing at
    // ports where nothing listens
    const SENTINEL: &str = "S3ntinel-f1le-pw";
    let mut outbox = Outbox::unmigrated().await;
    outbox.set_broker(crate::support::Broker::RabbitMq).await;
    let db_file = outbox.dir.path().join("db-url");
    std::fs::write(
        &db_file,
        format!("postgres://postgres:{SENTINEL}@127.0.0.1:1/outbox_relay_test\n"),
    )
    .unwrap();
    let amqp_file = outbox.dir.path().join("amqp-url");
    std::fs::write(
        &amqp_file,
        format!("amqp://guest:{SENTINEL}@127.0.0.1:1/%2f"),
    )
    .unwrap();
    outbox
        .rabbitmq
        .insert("url_file", format!("\"{}\"", amqp_file.display()));
    let config = std::fs::read_to_string(outbox.config_file())
        .unwrap()
        .replace(
            &format!("url = \"{}\"", crate::support::database_url()),
            &format!("url_file = \"{}\"", db_file.display()),
        )
        .replace(
            &format!("\"url\" = \"{}\"\n", crate::support::amqp_url()),
            "",
        );
    let path = outbox.dir.path().join("secrets.toml");
    std::fs::write(&path, &config).unwrap();

    // WHEN check fails to connect, and the relay runs into both outages
    let check = run_binary(&path, &["check"], &[]);
    let mut relay = RelayProcess::start(path.clone(), outbox.dir.path().join("secrets.log"));
    relay
        .wait_for_log("database unavailable", Duration::from_secs(30))
        .await;
    relay.signal(nix::sys::signal::Signal::SIGTERM);
    relay.wait_exit(Duration::from_secs(20)).await;

    // THEN the files were used (host and port appear), and the password appears nowhere
    assert_eq!(check.code(), Some(1), "{check:?}");
    assert!(check.stderr.contains("127.0.0.1:1"), "{check:?}");
    for text in [&check.stdout, &check.stderr, &relay.logs()] {
        assert!(!text.contains(SENTINEL), "secret printed: {text}");
    }
    // AND a file that cannot be read is a configuration error naming the key
    let missing = config.replace(&db_file.display().to_string(), "/nonexistent/db-url");
    let path = outbox.dir.path().join("missing.toml");
    std::fs::write(&path, missing).unwrap();
    let out = run_binary(&path, &["check"], &[]);
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("database.url_file"), "{out:?}");
}

#[tokio::test]
async fn the_notify_trigger_follows_the_configuration() {
    // GIVEN a migrated table (trigger installed by default)
    let outbox = Outbox::new().await;
    let config = std::fs::read_to_string(outbox.config_file()).unwrap();
    let without = outbox.dir.path().join("no-trigger.toml");
    std::fs::write(
        &without,
        config.replacen("[database]\n", "[database]\nnotify_trigger = false\n", 1),
    )
    .unwrap();
    // WHEN migrate runs with notify_trigger = false, THEN the trigger is dropped
    let out = run_binary(&without, &["migrate"], &[]);
    assert!(out.stdout.contains("notify trigger dropped"), "{out:?}");
    let check = outbox.command(&["check"]).success();
    assert!(check.stdout.contains("notify trigger: absent"), "{check:?}");
    // AND with the default again, it is back
    let out = outbox.migrate().success();
    assert!(out.stdout.contains("notify trigger installed"), "{out:?}");
    let check = outbox.command(&["check"]).success();
    assert!(
        check.stdout.contains("notify trigger: installed"),
        "{check:?}"
    );
}
