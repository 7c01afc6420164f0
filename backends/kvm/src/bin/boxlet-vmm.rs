//! `boxlet-vmm SPEC.json`: run one VM (a `boxlet::VmSpec` as JSON) on KVM to its end.
//! The guest console goes to stdout; exit status 0 when the guest reset or powered off,
//! 1 on any failure (with the reason on stderr). SIGUSR1 prints every vCPU's registers
//! on stderr.
//!
//! `boxlet-vmm --probe`: run the KVM probe now (not cached) and print its verdict; exit
//! status 0 when this KVM can boot Linux.

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 2 && args[1] == "--probe" {
        let p = boxlet_kvm::probe::run();
        println!("{}", p.reason);
        std::process::exit(if p.usable { 0 } else { 1 });
    }
    let [_, path] = args.as_slice() else {
        eprintln!("usage: boxlet-vmm SPEC.json | boxlet-vmm --probe");
        std::process::exit(2);
    };
    let spec: boxlet::VmSpec = match std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => {
            eprintln!("boxlet-vmm: {path}: {e}");
            std::process::exit(2);
        }
    };
    match boxlet_kvm::vmm::run(&spec) {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("boxlet-vmm: {e}");
            std::process::exit(1);
        }
    }
}
