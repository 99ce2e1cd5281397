//! The `outbox-relay` binary: everything lives in the library; see `cli`.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = outbox_relay::cli::Cli::parse();
    outbox_relay::cli::execute(cli)
}
