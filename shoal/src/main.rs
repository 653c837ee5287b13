//! `shoal`: the one front-door binary. Thin: parses arguments and config, wires crates.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::fmt::writer::BoxMakeWriter;

mod admin_cmd;
mod authority_cmd;
mod bench_cmd;
mod chat;
mod client_cmd;
mod demo_cmd;
mod gateway_cmd;
mod human_time;
mod network_file;
mod observe_cmd;
mod operator_cmd;
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
    /// Log format on stderr: `text` for people, `json` (one object per line) for log
    /// collectors. Overrides SHOAL_LOG_FORMAT; SHOAL_LOG sets the level.
    #[arg(long, global = true, value_enum, value_name = "FORMAT")]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run or set up a directory authority.
    #[command(subcommand)]
    Authority(authority_cmd::AuthorityCommand),
    /// Run or set up a mix relay.
    #[command(subcommand)]
    Relay(relay_cmd::RelayCommand),
    /// An operator's key and the certificates for the nodes it runs.
    #[command(subcommand)]
    Operator(operator_cmd::OperatorCommand),
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
    /// The global passive observer: attacks on a packet capture, scored against the truth.
    Observe(observe_cmd::ObserveArgs),
}

/// The format `--log-format` or else `SHOAL_LOG_FORMAT` asks for; text by default. An
/// unknown value in the variable is an error rather than a silent fallback, so an
/// operator who asked for JSON never ships text lines to a JSON collector.
fn log_format(flag: Option<LogFormat>) -> anyhow::Result<LogFormat> {
    if let Some(f) = flag {
        return Ok(f);
    }
    match std::env::var("SHOAL_LOG_FORMAT") {
        Err(_) => Ok(LogFormat::Text),
        Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
            "" | "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => anyhow::bail!("SHOAL_LOG_FORMAT={v:?}: expected `text` or `json`"),
        },
    }
}

/// One filter for both formats, so the caps below hold whatever the format.
fn log_filter() -> tracing_subscriber::EnvFilter {
    let mut filter = tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // openmls logs ratchet-tree keys at debug: group metadata, never wanted in a log,
    // whatever SHOAL_LOG says.
    for quiet in ["openmls=warn", "openmls_rust_crypto=warn"] {
        if let Ok(directive) = quiet.parse() {
            filter = filter.add_directive(directive);
        }
    }
    filter
}

/// Where log lines go: stderr, or for `shoal chat` a file in the client directory, since
/// a line written over the full-screen UI garbles it until the next redraw.
fn log_writer(command: &Command) -> anyhow::Result<(BoxMakeWriter, bool)> {
    let Command::Chat(args) = command else {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        return Ok((BoxMakeWriter::new(std::io::stderr), ansi));
    };
    if args.print_card {
        return Ok((BoxMakeWriter::new(std::io::stderr), false));
    }
    let path = args.dir.join(chat::LOG_FILE);
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let file = options
        .open(&path)
        .map_err(|e| anyhow::anyhow!("cannot open the chat's log file {}: {e}", path.display()))?;
    Ok((BoxMakeWriter::new(std::sync::Mutex::new(file)), false))
}

fn init_logging(format: LogFormat, writer: BoxMakeWriter, ansi: bool) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(log_filter())
        .with_writer(writer);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(ansi).try_init(),
        // Flattened: `message` and the event's fields at the top level, the spans
        // (peer, connection) in `spans`. Field values are the same Display/Debug text
        // the text format prints, so what one format keeps out of the logs the other
        // does too.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .try_init(),
    };
}

/// A 32-byte key or id written as 64 hex digits, as the CLI's arguments take them.
fn parse_hex32(s: &str) -> Result<[u8; 32], String> {
    s.parse::<shoal_topology::Hex32>().map(|h| h.0)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = match log_format(cli.log_format) {
        Ok(format) => format,
        Err(e) => {
            eprintln!("shoal: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let (writer, ansi) = match log_writer(&cli.command) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("shoal: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    init_logging(format, writer, ansi);
    let result = match cli.command {
        Command::Authority(cmd) => authority_cmd::run(cmd),
        Command::Relay(cmd) => relay_cmd::run(cmd),
        Command::Operator(cmd) => operator_cmd::run(cmd),
        Command::Gateway(cmd) => gateway_cmd::run(cmd),
        Command::Admin(cmd) => admin_cmd::run(cmd),
        Command::Sim(args) => sim_cmd::run(args),
        Command::Bench(args) => bench_cmd::run(args),
        Command::Client(cmd) => client_cmd::run(cmd),
        Command::Demo(args) => demo_cmd::run(args),
        Command::Chat(args) => chat::run(args),
        Command::Observe(args) => observe_cmd::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // A JSON collector gets the reason a node stopped as one more event.
            if format == LogFormat::Json {
                tracing::error!(error = %format!("{e:#}"), "shoal stopped with an error");
            } else {
                eprintln!("shoal: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}
