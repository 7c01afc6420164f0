//! Run a command in a box from your own program.
//!
//! `cargo run -p boxlet-qemu --example run_box -- KERNEL DISK [CMD...]`, with DISK an ext4
//! image (raw or qcow2) holding the agent at /boxlet/bin/boxlet-guest, as
//! `boxlet ext4 build OUT --dir DIR --agent` makes. `make demo` does it all.

use std::time::Duration;

use boxlet::{boot, BootSpec, Exec, ExecEvent, Root};
use boxlet_qemu::Qemu;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [kernel, disk, cmd @ ..] = args.as_slice() else {
        return Err("usage: run_box KERNEL DISK [CMD...]".into());
    };
    let cmd = if cmd.is_empty() {
        vec!["uname".to_string(), "-a".to_string()]
    } else {
        cmd.to_vec()
    };

    let hv = Qemu::new()?; // finds QEMU and the vhost-user daemons, probes for KVM
    let root = Root::Disk {
        path: disk.into(),
        read_only: false,
    };
    let vm = boot(&hv, BootSpec::new("example", kernel, root)).await?;
    println!("agent ready after {:?}", vm.boot_time());

    // Collect everything at once...
    let out = vm
        .agent()
        .run(
            Exec {
                args: cmd,
                ..Exec::default()
            },
            None,
        )
        .await?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    println!("exit: {:?}", out.status);

    // ...or stream a long-running process and signal it.
    let mut s = vm
        .agent()
        .exec(Exec {
            args: vec!["sh".into(), "-c".into(), "echo working; sleep 60".into()],
            ..Exec::default()
        })
        .await?;
    while let Some(ev) = s.next().await? {
        match ev {
            ExecEvent::Stdout(b) => {
                print!("{}", String::from_utf8_lossy(&b));
                s.signal(15).await?;
            }
            ExecEvent::Stderr(b) => eprint!("{}", String::from_utf8_lossy(&b)),
            ExecEvent::Exit(st) => println!("ended: {st:?}"),
        }
    }

    // The agent syncs and powers off; the VM's processes and sockets go with it.
    let exit = vm.shutdown(Duration::from_secs(10)).await?;
    println!("VM ended: {exit:?}");
    Ok(())
}
