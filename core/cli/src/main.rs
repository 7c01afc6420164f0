//! `boxlet`: run untrusted code in microVMs, and inspect the disk formats behind them.

mod agent;
mod bench;
mod ext4;
mod image;
mod kernel;
mod qcow2;
mod run;
mod size;
mod store;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// boxlet: an embeddable microVM runtime.
#[derive(Debug, Parser)]
#[command(name = "boxlet", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// qcow2 images: inspect, create, export, write, check.
    #[command(subcommand)]
    Qcow2(qcow2::Qcow2Command),
    /// ext4 images: inspect, list, read files.
    #[command(subcommand)]
    Ext4(ext4::Ext4Command),
    /// The guest kernel: build it, find it.
    #[command(subcommand)]
    Kernel(kernel::KernelCommand),
    /// Boot VMs and run commands in them.
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Run a command in a new box made from a stored image (removed when it ends).
    Run(run::RunArgs),
    /// Benchmarks: the rootfs strategies against each other.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Pull an image from a registry into the store.
    Pull(image::PullArgs),
    /// Import an OCI image layout directory or a `docker save` archive into the store.
    Import(image::ImportArgs),
    /// List the images in the store.
    Images(image::ImagesArgs),
    /// Forget an image (its blobs go at the next `boxlet store gc`).
    Rmi(image::RmiArgs),
    /// Apply an image's layers, securely, into a directory.
    Unpack(image::UnpackArgs),
    /// The content store under $BOXLET_HOME (default ~/.boxlet): verify, gc, du.
    #[command(subcommand)]
    Store(store::StoreCommand),
}

fn main() -> ExitCode {
    // Library warnings (e.g. "no KVM: running under TCG") go to stderr; RUST_LOG for more.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .with_target(false)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            // `boxlet run` with a bad option is boxlet's own failure, as docker's 125.
            let run = std::env::args_os().nth(1).is_some_and(|a| a == "run");
            let help = matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            );
            if run && !help {
                let _ = e.print();
                return ExitCode::from(EXIT_BOXLET_FAILED);
            }
            e.exit()
        }
    };
    let run = matches!(cli.command, Command::Run(_));
    let res = match cli.command {
        Command::Qcow2(cmd) => qcow2::run(cmd),
        Command::Ext4(cmd) => ext4::run(cmd),
        Command::Kernel(cmd) => kernel::run(cmd),
        Command::Vm(cmd) => vm::run(cmd),
        Command::Store(cmd) => store::run(cmd),
        Command::Pull(args) => image::pull(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Run(args) => run::run(args),
        Command::Import(args) => image::import(args),
        Command::Images(args) => image::images(args),
        Command::Rmi(args) => image::rmi(args),
        Command::Unpack(args) => image::unpack(args),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("boxlet: {}", one_line(&e));
            if run {
                run_failure_code(&e)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// What `boxlet run` exits with when boxlet itself failed (no such image, a bad option, a
/// box that could not start), as docker's `run` does.
const EXIT_BOXLET_FAILED: u8 = 125;

/// `boxlet run`'s exit code for an error: the shell's 127 or 126 when the command could
/// not be run (not found, not executable), else [`EXIT_BOXLET_FAILED`].
fn run_failure_code(e: &anyhow::Error) -> ExitCode {
    let unrunnable = e.chain().find_map(|c| match c.downcast_ref() {
        Some(boxlet::agent::AgentError::CannotRun { why, .. }) => Some(*why),
        _ => None,
    });
    match unrunnable {
        Some(why) => ExitCode::from(why.exit_code() as u8),
        None => ExitCode::from(EXIT_BOXLET_FAILED),
    }
}

/// An error on one line: the outermost context, then each cause the message before it
/// does not already end with (most of boxlet's errors name their source themselves).
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !msg.ends_with(&cause) {
            msg.push_str(": ");
            msg.push_str(&cause);
        }
    }
    msg
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_error_names_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        // A message that already ends with its source's (as boxlet's errors do).
        #[derive(Debug)]
        struct Named(std::io::Error);
        impl std::fmt::Display for Named {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "reading /x/oci-layout: {}", self.0)
            }
        }
        impl std::error::Error for Named {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let e = anyhow::Error::new(Named(io)).context("importing /x");
        assert_eq!(
            super::one_line(&e),
            "importing /x: reading /x/oci-layout: no such file"
        );
        // A context without its cause's words gets them.
        let e = anyhow::anyhow!("disk full").context("writing the box");
        assert_eq!(super::one_line(&e), "writing the box: disk full");
    }
}
