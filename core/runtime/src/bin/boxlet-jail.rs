//! `boxlet-jail SPEC PROGRAM [ARGS...]`: run PROGRAM confined as the JSON jail spec SPEC
//! says (see `boxlet::jail`). Exits 125 when the jail cannot be made, 126 when PROGRAM
//! cannot be run, else as PROGRAM does. `boxlet-jail --probe-rootless` says whether this
//! user may make a rootless jail's namespaces (exit 0, or 125 and why not).

use std::os::unix::process::CommandExt;

fn main() {
    #[cfg(target_os = "linux")]
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == boxlet::jail::PROBE_ARG)
    {
        if let Err(e) = boxlet::jail::probe_rootless() {
            eprintln!("boxlet-jail: {e}");
            std::process::exit(125);
        }
        return;
    }
    let (spec, program, args) = match boxlet::jail::parse_args(std::env::args_os().skip(1)) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("boxlet-jail: {e}");
            std::process::exit(125);
        }
    };
    #[cfg(target_os = "linux")]
    if let Err(e) = boxlet::jail::enter(&spec, &program) {
        eprintln!("boxlet-jail: {e}");
        std::process::exit(125);
    }
    let err = std::process::Command::new(&program).args(&args).exec();
    eprintln!("boxlet-jail: {}: {err}", program.display());
    std::process::exit(126);
}
