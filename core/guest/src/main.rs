//! `boxlet-guest`: PID 1 in a box, or (`--listen-unix PATH`) the same agent on the host.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("--version") => {
            println!(
                "boxlet-guest {} (protocol {})",
                env!("CARGO_PKG_VERSION"),
                boxlet_guest::proto::PROTOCOL_VERSION
            );
        }
        Some("--listen-unix") if args.len() == 3 => {
            if let Err(e) = boxlet_guest::serve::unix(std::path::Path::new(&args[2])) {
                eprintln!("boxlet-guest: {}: {e}", args[2]);
                std::process::exit(1);
            }
        }
        _ if std::process::id() == 1 => boxlet_guest::init::run(),
        _ => {
            eprintln!("usage: boxlet-guest (as PID 1) | --listen-unix PATH | --version");
            std::process::exit(2);
        }
    }
}
