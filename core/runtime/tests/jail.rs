//! The jail every VMM process and daemon starts in, from the inside: a shell run through
//! `boxlet-jail` sees no host process, no host file it was not given, no network, and
//! has no capability and no way to gain one.

use std::path::Path;
use std::process::Command;

use boxlet::jail::{system_binds, Bind, JailSpec};

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// `boxlet-jail SPEC` with a spec of `binds`, the spec and root in `dir`.
fn jail_command(dir: &Path, binds: Vec<Bind>) -> Command {
    let spec = JailSpec::new(dir.join("root"), binds);
    std::fs::create_dir_all(&spec.root).unwrap();
    let file = dir.join("spec.json");
    std::fs::write(&file, serde_json::to_vec(&spec).unwrap()).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_boxlet-jail"));
    cmd.arg(&file);
    cmd
}

/// Run `args` through `boxlet-jail` with `binds`, the spec and root in `dir`.
fn run_jailed(dir: &Path, binds: Vec<Bind>, args: &[&std::ffi::OsStr]) -> std::process::Output {
    jail_command(dir, binds).args(args).output().unwrap()
}

/// Run `script` with /bin/sh in a jail holding `dir` (writable) and `ro` (read-only).
fn jailed(dir: &Path, ro: &Path, script: &str) -> std::process::Output {
    let mut binds = system_binds();
    binds.push(Bind::rw(dir));
    binds.push(Bind::ro(ro));
    let args = ["/bin/sh", "-c", script, "sh"].map(std::ffi::OsStr::new);
    let mut all: Vec<&std::ffi::OsStr> = args.to_vec();
    all.extend([dir.as_os_str(), ro.as_os_str()]);
    run_jailed(dir, binds, &all)
}

#[test]
fn a_jailed_process_sees_only_what_it_was_given_and_holds_no_capability() {
    if !is_root() {
        eprintln!("skipped: the jail needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ro = tempfile::tempdir().unwrap();
    std::fs::write(ro.path().join("given"), b"ro").unwrap();
    let out = jailed(
        dir.path(),
        ro.path(),
        "echo pids: $(ls /proc | grep -E '^[0-9]+$' | tr '\\n' ' '); \
         echo root: $(ls -A / | tr '\\n' ' '); \
         grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs)' /proc/self/status; \
         echo net: $(tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '); \
         test -e /etc/shadow && echo sees-shadow; test -e /root && echo sees-root; \
         mknod /tmp/dev b 8 0 2>/dev/null && echo made-a-device; \
         echo x > \"$1\"/w && echo wrote-rw; echo x > \"$2\"/given 2>/dev/null && echo wrote-ro; \
         cat \"$2\"/given; echo; \
         hostname boxlet 2>/dev/null && echo renamed-host; \
         cat /proc/sys/kernel/core_pattern > /tmp/cp; \
         cat /tmp/cp > /proc/sys/kernel/core_pattern 2>/dev/null && echo wrote-a-sysctl; \
         echo jailed > /proc/self/comm 2>/dev/null && echo wrote-proc; \
         test -s /proc/kcore && echo sees-kcore; true",
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("no {key} in {text}"))
            .to_string()
    };
    // Its own PID namespace: the shell is PID 1 and nothing of the host shows.
    let pids: Vec<u32> = line("pids:")[5..]
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(
        pids.contains(&1) && pids.iter().all(|&p| p < 10),
        "{pids:?}"
    );
    // Its own root: the system's read-only trees, /proc, /tmp, /dev's few nodes, and
    // the two directories (under /tmp).
    let root_line = line("root:");
    let mut root: Vec<&str> = root_line[5..].split_whitespace().collect();
    root.sort();
    for name in &root {
        assert!(
            [
                "bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "tmp",
                "usr"
            ]
            .contains(name),
            "{name} in the jail's root: {root:?}"
        );
    }
    assert!(
        !text.contains("sees-shadow") && !text.contains("sees-root"),
        "{text}"
    );
    for key in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert!(line(key).ends_with("0000000000000000"), "{}", line(key));
    }
    assert!(line("NoNewPrivs").ends_with('1'), "{text}");
    assert_eq!(line("net:"), "net: lo", "only its own loopback");
    assert!(!text.contains("made-a-device"), "{text}");
    assert!(!text.contains("renamed-host"), "{text}");
    // A root without capabilities could still write sysctls by file mode (core_pattern
    // names a program the host runs as root): /proc/sys is read-only, kcore hidden.
    assert!(!text.contains("wrote-a-sysctl"), "{text}");
    assert!(!text.contains("wrote-proc"), "/proc is read-only: {text}");
    assert!(!text.contains("sees-kcore"), "{text}");
    assert!(
        text.contains("wrote-rw") && !text.contains("wrote-ro"),
        "{text}"
    );
    assert!(text.contains("\nro\n"), "{text}");
    assert_eq!(std::fs::read(dir.path().join("w")).unwrap(), b"x\n");
}

#[test]
fn a_jail_that_cannot_be_made_is_an_error_not_an_unconfined_program() {
    if !is_root() {
        eprintln!("skipped: the jail needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let args = ["/bin/echo", "ran"].map(std::ffi::OsStr::new);
    let out = run_jailed(dir.path(), vec![Bind::ro("/no/such/path")], &args);
    assert_eq!(out.status.code(), Some(125));
    assert!(out.stdout.is_empty());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("/no/such/path"), "{e}");
}

#[test]
fn a_jail_whose_outer_process_dies_before_it_is_made_never_runs_its_program() {
    if !is_root() {
        eprintln!("skipped: the jail needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut binds = system_binds();
    binds.push(Bind::rw(dir.path()));
    let marker = dir.path().join("ran");
    // The child waits 500 ms before it asks for the parent's death signal; the parent
    // is killed meanwhile.
    let mut jail = jail_command(dir.path(), binds)
        .env("BOXLET_JAIL_TEST_FORK_DELAY_MS", "500")
        .args(["/bin/sh", "-c", "echo ran > \"$1\"", "sh"])
        .arg(&marker)
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    jail.kill().unwrap();
    jail.wait().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(
        !marker.exists(),
        "the program ran although the jail's outer process was gone"
    );
}

#[test]
fn a_daemon_filter_lets_a_program_start_and_kills_it_at_a_forbidden_call() {
    use std::os::unix::process::ExitStatusExt;
    if !is_root() {
        eprintln!("skipped: the jail needs root");
        return;
    }
    let run = |script: &str| {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = JailSpec::new(dir.path().join("root"), system_binds());
        spec.seccomp = Some(boxlet::jail::SeccompProfile::VhostDeviceVsock);
        std::fs::create_dir_all(&spec.root).unwrap();
        let file = dir.path().join("spec.json");
        std::fs::write(&file, serde_json::to_vec(&spec).unwrap()).unwrap();
        Command::new(env!("CARGO_BIN_EXE_boxlet-jail"))
            .arg(&file)
            .args(["/usr/bin/perl", "-e", script])
            .output()
            .unwrap()
    };
    // A dynamically linked program starts and runs under the daemon's filter...
    let ok = run("print qq(started\\n)");
    assert!(ok.status.success(), "{ok:?}");
    assert_eq!(ok.stdout, b"started\n");
    // ...and a call outside it (ptrace, 101) kills it with SIGSYS.
    let killed = run("syscall(101, 0, 0, 0, 0); print qq(survived\\n)");
    assert_eq!(
        killed.status.signal(),
        Some(boxlet::process::SIGSYS),
        "{killed:?}"
    );
    assert!(killed.stdout.is_empty(), "{killed:?}");
}

#[test]
fn a_wrapped_command_keeps_the_environment_it_was_given() {
    let dir = tempfile::tempdir().unwrap();
    let jailer = boxlet::jail::Jailer::Helper(env!("CARGO_BIN_EXE_boxlet-jail").into());
    let mut cmd = tokio::process::Command::new("/bin/true");
    cmd.env("BOXLET_VMM_KERNEL_IMAGE", "/cache/k.img")
        .env_remove("HOME");
    let spec = JailSpec::new(dir.path().join("root"), system_binds());
    let wrapped = jailer.wrap(spec, cmd).unwrap();
    let envs: Vec<_> = wrapped.as_std().get_envs().collect();
    assert!(envs.contains(&(
        std::ffi::OsStr::new("BOXLET_VMM_KERNEL_IMAGE"),
        Some(std::ffi::OsStr::new("/cache/k.img"))
    )));
    assert!(envs.contains(&(std::ffi::OsStr::new("HOME"), None)));
}
