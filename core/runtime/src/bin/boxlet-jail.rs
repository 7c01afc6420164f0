//! `boxlet-jail SPEC PROGRAM [ARGS...]`: run PROGRAM confined as the JSON jail spec SPEC
//! says (see `boxlet::jail`). Exits 125 when the jail cannot be made, 126 when PROGRAM
//! cannot be run, else as PROGRAM does.

use std::os::unix::process::CommandExt;

fn main() {
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
