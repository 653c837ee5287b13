//! `shoal`: the one front-door binary. Thin: parses arguments and config, wires crates.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod admin_cmd;
mod authority_cmd;
mod bench_cmd;
mod chat;
mod client_cmd;
mod demo_cmd;
mod gateway_cmd;
mod relay_cmd;
mod runtime;
mod sim_cmd;
mod status;

#[derive(Parser, Debug)]
#[command(
    name = "shoal",
    version,
    about = "Shoal mix network and managed group messenger"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run or set up a directory authority.
    #[command(subcommand)]
    Authority(authority_cmd::AuthorityCommand),
    /// Run or set up a mix relay.
    #[command(subcommand)]
    Relay(relay_cmd::RelayCommand),
    /// Run a subnet: admin key, policy, member credentials, commands to gateways.
    #[command(subcommand)]
    Admin(admin_cmd::AdminCommand),
    /// Run or set up a gateway (entry/exit hop with mailboxes), and manage its accounts.
    #[command(subcommand)]
    Gateway(gateway_cmd::GatewayCommand),
    /// Traffic-analysis simulation (model mode) and parameter sweeps.
    Sim(sim_cmd::SimArgs),
    /// Benchmarks: ratios against ceilings measured in the same run.
    Bench(bench_cmd::BenchArgs),
    /// A Loopix client: identity, contacts, send, read, run.
    #[command(subcommand)]
    Client(client_cmd::ClientCommand),
    /// A whole mix network on loopback: send messages, deliver them, report.
    Demo(demo_cmd::DemoArgs),
    /// An interactive terminal chat (groups and contacts) on the client in --dir.
    Chat(chat::ChatArgs),
}

fn init_logging() {
    let mut filter = tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // openmls logs ratchet-tree keys at debug: group metadata, never wanted in a log,
    // whatever SHOAL_LOG says.
    for quiet in ["openmls=warn", "openmls_rust_crypto=warn"] {
        if let Ok(directive) = quiet.parse() {
            filter = filter.add_directive(directive);
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Authority(cmd) => authority_cmd::run(cmd),
        Command::Relay(cmd) => relay_cmd::run(cmd),
        Command::Gateway(cmd) => gateway_cmd::run(cmd),
        Command::Admin(cmd) => admin_cmd::run(cmd),
        Command::Sim(args) => sim_cmd::run(args),
        Command::Bench(args) => bench_cmd::run(args),
        Command::Client(cmd) => client_cmd::run(cmd),
        Command::Demo(args) => demo_cmd::run(args),
        Command::Chat(args) => chat::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shoal: {e:#}");
            ExitCode::FAILURE
        }
    }
}
