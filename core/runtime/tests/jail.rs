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

/// Run `script` with /bin/sh in a jail holding `dir` (writable) and `ro` (read-only),
/// made by `user` (this process's user when `None`).
fn jailed(dir: &Path, ro: &Path, user: Option<u32>, script: &str) -> std::process::Output {
    let mut binds = system_binds();
    binds.push(Bind::rw(dir));
    binds.push(Bind::ro(ro));
    let mut cmd = jail_command(dir, binds);
    cmd.args(["/bin/sh", "-c", script, "sh"]).args([dir, ro]);
    if let Some(uid) = user {
        give_to(dir, uid);
        give_to(ro, uid);
        std::os::unix::process::CommandExt::uid(&mut cmd, uid);
        std::os::unix::process::CommandExt::gid(&mut cmd, uid);
    }
    cmd.output().unwrap()
}

/// An id no account on a test host has: what root's tests drop to, to make a jail as
/// an ordinary user would.
const ORDINARY_USER: u32 = 61_777;

/// `dir` and what is in it, owned by `uid`.
fn give_to(dir: &Path, uid: u32) {
    for entry in walk(dir) {
        std::os::unix::fs::lchown(&entry, Some(uid), Some(uid)).unwrap();
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut all = vec![dir.to_path_buf()];
    if dir.is_dir() && !dir.is_symlink() {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            all.extend(walk(&e.path()));
        }
    }
    all
}

/// Whether this host lets an ordinary user make a rootless jail; says why not if it
/// does not (the rootless tests then skip).
fn rootless_jails_allowed() -> bool {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_boxlet-jail"));
    cmd.arg(boxlet::jail::PROBE_ARG);
    if is_root() {
        std::os::unix::process::CommandExt::uid(&mut cmd, ORDINARY_USER);
        std::os::unix::process::CommandExt::gid(&mut cmd, ORDINARY_USER);
    }
    let out = cmd.output().unwrap();
    if !out.status.success() {
        eprintln!(
            "skipped: this host makes no rootless jail: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out.status.success()
}

#[test]
fn a_jailed_process_sees_only_what_it_was_given_and_holds_no_capability() {
    if !is_root() {
        eprintln!("skipped: the jail needs root");
        return;
    }
    sees_only_what_it_was_given(None);
}

#[test]
fn a_rootless_jail_holds_as_the_rooted_one_does() {
    if !rootless_jails_allowed() {
        return;
    }
    // Root's test drops to an ordinary user; an ordinary user's runs as itself.
    sees_only_what_it_was_given(is_root().then_some(ORDINARY_USER));
}

fn sees_only_what_it_was_given(user: Option<u32>) {
    let dir = tempfile::tempdir().unwrap();
    let ro = tempfile::tempdir().unwrap();
    std::fs::write(ro.path().join("given"), b"ro").unwrap();
    let out = jailed(
        dir.path(),
        ro.path(),
        user,
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
    assert!(!envs
        .iter()
        .any(|(k, v)| *k == std::ffi::OsStr::new("HOME") && v.is_some()));
}

#[test]
fn a_jailed_program_gets_none_of_the_callers_environment_but_what_it_needs() {
    if !is_root() && !rootless_jails_allowed() {
        return;
    }
    // This test's own environment (cargo's variables, HOME, whatever the caller holds)
    // stays out; PATH, boxlet-vmm's switches and what the command set get in.
    let passed = |key: &str| {
        boxlet::jail::PASSED_ENV.contains(&key)
            || boxlet::jail::PASSED_ENV_PREFIXES
                .iter()
                .any(|p| key.starts_with(p))
    };
    let outsider = std::env::vars()
        .map(|(k, _)| k)
        .find(|k| !passed(k))
        .expect("a variable of this test's own (HOME)");
    let dir = tempfile::tempdir().unwrap();
    let out = run_as_user(
        dir.path(),
        None,
        if is_root() {
            boxlet::jail::RunAs::Root
        } else {
            boxlet::jail::RunAs::Caller
        },
        |_| {},
        "env",
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{out:?}");
    for line in text.lines() {
        let key = line.split('=').next().unwrap();
        // (The shell's own: PWD, SHLVL, _.)
        assert!(
            passed(key) || ["PWD", "SHLVL", "_"].contains(&key),
            "{key} reached the jailed program: {text}"
        );
    }
    assert!(!text.contains(&format!("{outsider}=")), "{text}");
    assert!(text.contains("PATH="), "{text}");
}

#[test]
fn a_file_server_of_a_users_directory_makes_no_set_id_file() {
    if !is_root() && !rootless_jails_allowed() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    // chmod, open(O_CREAT) and mknod with S_ISUID or S_ISGID; openat2 (its mode hidden
    // in memory); and the same calls without the bits.
    let script = format!(
        "chmod(04755, '{d}/a') or print qq(chmod-suid $!\\n); \
         chmod(02755, '{d}/a') or print qq(chmod-sgid $!\\n); \
         chmod(0750, '{d}/a') and print qq(chmod-plain\\n); \
         use Fcntl; sysopen(F, '{d}/b', O_CREAT|O_WRONLY, 04755) or print qq(create-suid $!\\n); \
         sysopen(G, '{d}/c', O_CREAT|O_WRONLY, 0644) and print qq(create-plain\\n); \
         my $p = '{d}'; my $h = qq(\\0) x 24; \
         $r = syscall(437, -100, $p, $h, 24); print qq(openat2 $!\\n) if $r < 0;"
    );
    std::fs::write(dir.path().join("a"), b"").unwrap();
    let out = perl_jailed_in(dir.path(), |s| s.no_set_id_files = true, &script);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{out:?}");
    assert!(
        text.contains("chmod-suid Operation not permitted"),
        "{text}"
    );
    assert!(
        text.contains("chmod-sgid Operation not permitted"),
        "{text}"
    );
    assert!(
        text.contains("create-suid Operation not permitted"),
        "{text}"
    );
    assert!(
        text.contains("chmod-plain") && text.contains("create-plain"),
        "{text}"
    );
    assert!(text.contains("openat2 Function not implemented"), "{text}");
    assert!(!dir.path().join("b").exists());
    let mode = std::fs::metadata(dir.path().join("a"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o750);
    // Without the filter the same chmod makes a set-user-ID file.
    let out = perl_jailed_in(
        dir.path(),
        |_| {},
        &format!("chmod(04755, '{d}/a') or die $!"),
    );
    assert!(out.status.success(), "{out:?}");
    let mode = std::fs::metadata(dir.path().join("a"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o4755);
}

/// Run perl's `script` in a jail (this process's kind: root's or rootless) with `dir`
/// writable, the spec adjusted by `adjust`.
fn perl_jailed_in(
    dir: &Path,
    adjust: impl FnOnce(&mut JailSpec),
    script: &str,
) -> std::process::Output {
    let helper = env!("CARGO_BIN_EXE_boxlet-jail").into();
    let jailer = if is_root() {
        boxlet::jail::Jailer::Helper(helper)
    } else {
        boxlet::jail::Jailer::Rootless(helper)
    };
    let mut binds = system_binds();
    binds.push(Bind::rw(dir));
    let mut spec = JailSpec::new(dir.join("root"), binds);
    if !is_root() {
        spec.run_as = boxlet::jail::RunAs::Caller;
    }
    adjust(&mut spec);
    let mut cmd = tokio::process::Command::new("/usr/bin/perl");
    cmd.args(["-e", script]);
    jailer
        .wrap(spec, cmd)
        .unwrap()
        .as_std_mut()
        .output()
        .unwrap()
}

#[test]
fn a_root_jail_refuses_to_run_a_program_as_the_caller() {
    if !is_root() {
        eprintln!("skipped: the jail needs root");
        return;
    }
    // Root's ids without capabilities still own root's files: a VM identity instead.
    let dir = tempfile::tempdir().unwrap();
    let out = run_as_user(
        dir.path(),
        None,
        boxlet::jail::RunAs::Caller,
        |_| {},
        "echo ran",
    );
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("rootless"),
        "{out:?}"
    );
}

/// Run `script` with /bin/sh through [`boxlet::jail::Jailer::wrap`] in a jail running
/// as `run_as`, with `dir` writable; its stdout.
fn run_as(dir: &Path, run_as: boxlet::jail::RunAs, script: &str) -> String {
    let out = run_as_user(dir, None, run_as, |_| {}, script);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// [`run_as`] made by `user` (a rootless jail; this process's user when `None`), the
/// spec adjusted by `adjust`; its output, whatever the status.
fn run_as_user(
    dir: &Path,
    user: Option<u32>,
    run_as: boxlet::jail::RunAs,
    adjust: impl FnOnce(&mut JailSpec),
    script: &str,
) -> std::process::Output {
    let helper = env!("CARGO_BIN_EXE_boxlet-jail").into();
    let jailer = if user.is_some() || !is_root() {
        boxlet::jail::Jailer::Rootless(helper)
    } else {
        boxlet::jail::Jailer::Helper(helper)
    };
    let mut binds = system_binds();
    binds.push(Bind::rw(dir));
    let mut spec = JailSpec::new(dir.join("root"), binds);
    spec.run_as = run_as;
    adjust(&mut spec);
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.args(["-c", script]);
    let mut cmd = jailer.wrap(spec, cmd).unwrap();
    if let Some(uid) = user {
        give_to(dir, uid);
        cmd.uid(uid).gid(uid);
    }
    cmd.as_std_mut().output().unwrap()
}

/// The id the rootless tests make their jails as: an ordinary user dropped to by root,
/// or this process's own.
fn rootless_user() -> (Option<u32>, u32) {
    if is_root() {
        (Some(ORDINARY_USER), ORDINARY_USER)
    } else {
        (None, rustix::process::getuid().as_raw())
    }
}

#[test]
fn a_rootless_jail_runs_a_vms_program_as_the_caller_with_nothing_more() {
    if !rootless_jails_allowed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (user, uid) = rootless_user();
    let out = run_as_user(
        dir.path(),
        user,
        boxlet::jail::RunAs::Caller,
        |_| {},
        "cat /proc/self/status; echo map $(cat /proc/self/uid_map); echo umask $(umask); \
         touch /tmp/mine && stat -c 'made %u' /tmp/mine; \
         echo x > /etc/ld.so.cache 2>/dev/null && echo wrote-root-file; \
         unshare -r true 2>/dev/null && echo nested-user-namespace; true",
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{out:?}");
    let id = uid.to_string();
    // Its own ids, in and out of the namespace, which maps nothing else.
    assert_eq!(status_field(&text, "Uid"), [id.as_str(); 4].join(" "));
    assert!(text.contains(&format!("map {uid} {uid} 1\n")), "{text}");
    for key in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(&text, key), "0000000000000000", "{key}");
    }
    assert_eq!(status_field(&text, "NoNewPrivs"), "1");
    assert!(text.contains("umask 0077"), "{text}");
    assert!(text.contains(&format!("made {uid}")), "{text}");
    assert!(!text.contains("wrote-root-file"), "{text}");
}

#[test]
fn a_rootless_daemons_root_is_the_caller_on_the_host_and_makes_nothing_of_anyone_elses() {
    if !rootless_jails_allowed() {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let (user, uid) = rootless_user();
    let d = dir.path().display();
    // virtiofsd's capabilities, which hold over the jail's namespaces only.
    let out = run_as_user(
        dir.path(),
        user,
        boxlet::jail::RunAs::Root,
        |spec| spec.keep_caps = boxlet::jail::VIRTIOFSD_CAPS.to_vec(),
        &format!(
            "cat /proc/self/status; echo map $(cat /proc/self/uid_map); \
             echo x > {d}/by-root && echo wrote; \
             chown 1:1 {d}/by-root 2>/dev/null && echo gave-away; \
             mknod {d}/dev b 8 0 2>/dev/null && echo made-a-device; true"
        ),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{out:?}");
    // Root in the namespace, which maps it to the caller alone.
    assert!(status_field(&text, "Uid").starts_with("0 0 0"), "{text}");
    assert!(text.contains(&format!("map 0 {uid} 1\n")), "{text}");
    let kept = boxlet::jail::VIRTIOFSD_CAPS
        .iter()
        .fold(0u64, |m, &c| m | 1 << c);
    assert_eq!(status_field(&text, "CapEff"), format!("{kept:016x}"));
    assert!(text.contains("wrote"), "{text}");
    assert!(
        !text.contains("gave-away"),
        "no id but the caller's: {text}"
    );
    assert!(!text.contains("made-a-device"), "{text}");
    let made = std::fs::metadata(dir.path().join("by-root")).unwrap();
    assert_eq!(
        (made.uid(), made.gid()),
        (uid, uid),
        "the caller's on the host"
    );
    assert!(!dir.path().join("dev").exists());
}

#[test]
fn a_root_daemon_in_its_own_user_namespace_owns_only_the_ids_it_was_given() {
    if !is_root() {
        eprintln!("skipped: the jail needs root");
        return;
    }
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let base = boxlet::rootfs::CACHE_IDS.base();
    // The directory is the range's root's, as a box's own root is; in it, a file of host
    // root's anyone may read, and one only root may.
    std::os::unix::fs::chown(dir.path(), Some(base), Some(base)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(dir.path().join("roots"), b"r\n").unwrap();
    std::fs::write(dir.path().join("secret"), b"s\n").unwrap();
    std::fs::set_permissions(
        dir.path().join("secret"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let d = dir.path().display();
    let range = vec![boxlet::jail::IdRange {
        inside: 0,
        outside: base,
        count: 65536,
    }];
    let out = run_as_user(
        dir.path(),
        None,
        boxlet::jail::RunAs::Root,
        |spec| {
            spec.keep_caps = boxlet::jail::VIRTIOFSD_CAPS.to_vec();
            spec.id_maps = Some(boxlet::jail::IdMaps {
                uids: range.clone(),
                gids: range.clone(),
                owner: Some(base),
            });
        },
        &format!(
            "cat /proc/self/status; echo map $(cat /proc/self/uid_map); \
             perl -e 'open(F, q(<), q(/proc/self/ns/user)) or die; $u = pack(q(L), 7); \
                      ioctl(F, 0xb704, $u) or die $!; print qq(owner ), unpack(q(L), $u), qq(\\n)'; \
             echo x > {d}/new && echo wrote; chown 5:6 {d}/new && echo shifted; \
             chown 70000 {d}/new 2>/dev/null && echo past-the-range; \
             echo y >> {d}/roots 2>/dev/null && echo wrote-roots-file; \
             cat {d}/secret 2>/dev/null && echo read-roots-secret; \
             mknod {d}/dev b 8 0 2>/dev/null && echo made-a-device; true"
        ),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{out:?}");
    // Root of a namespace that maps the range alone, no supplementary group.
    assert!(status_field(&text, "Uid").starts_with("0 0 0"), "{text}");
    assert_eq!(status_field(&text, "Groups"), "", "{text}");
    assert!(text.contains(&format!("map 0 {base} 65536\n")), "{text}");
    // Its namespace is the range's root's (0 inside), not host root's (unmapped inside):
    // no host process of root's ids has power over it.
    assert!(text.contains("owner 0\n"), "{text}");
    let kept = boxlet::jail::VIRTIOFSD_CAPS
        .iter()
        .fold(0u64, |m, &c| m | 1 << c);
    assert_eq!(status_field(&text, "CapEff"), format!("{kept:016x}"));
    // What it makes is the range's; its capabilities reach nothing of host root's.
    assert!(text.contains("wrote") && text.contains("shifted"), "{text}");
    let made = std::fs::metadata(dir.path().join("new")).unwrap();
    assert_eq!((made.uid(), made.gid()), (base + 5, base + 6));
    for bad in [
        "past-the-range",
        "wrote-roots-file",
        "read-roots-secret",
        "made-a-device",
    ] {
        assert!(!text.contains(bad), "{bad}: {text}");
    }
    assert_eq!(std::fs::read(dir.path().join("roots")).unwrap(), b"r\n");
}

#[test]
fn a_rootless_jail_refuses_to_run_a_program_as_a_vm_identity() {
    if !rootless_jails_allowed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (user, _) = rootless_user();
    let who = boxlet::jail::Identity {
        id: boxlet::jail::VM_IDS.0 + 7,
    };
    let out = run_as_user(
        dir.path(),
        user,
        boxlet::jail::RunAs::Vm(who),
        |_| {},
        "echo ran",
    );
    assert_eq!(out.status.code(), Some(125), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("rootless jail has no VM identity"), "{e}");
}

/// The value of `key` in `text`'s lines of `/proc/self/status`, whitespace collapsed.
fn status_field(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in {text}"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn a_program_run_as_the_vms_identity_has_its_ids_and_nothing_of_root() {
    if !is_root() {
        eprintln!("skipped: the jail needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let who = boxlet::jail::Identity {
        id: boxlet::jail::VM_IDS.0 + 4242,
    };
    let text = run_as(
        dir.path(),
        boxlet::jail::RunAs::Vm(who),
        "cat /proc/self/status; echo umask $(umask); echo env ${BOXLET_RUN_AS:-none}; \
         touch /tmp/mine && stat -c 'made %u:%g' /tmp/mine; \
         echo x > /etc/ld.so.cache 2>/dev/null && echo wrote-root-file; \
         grep -E '^Max (open files|processes)' /proc/self/limits; true",
    );
    let id = who.id.to_string();
    // Ceilings on its descriptors, and on its identity's tasks (no cgroup needed).
    let limit = |name: &str| -> Vec<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("Max {name}")))
            .unwrap_or_else(|| panic!("no {name} limit in {text}"))
            .split_whitespace()
            .take(2)
            .map(str::to_owned)
            .collect()
    };
    let files = limit("open files");
    assert!(
        files
            .iter()
            .all(|v| v.parse::<u64>().is_ok_and(|n| n <= 65536)),
        "{files:?}"
    );
    assert_eq!(limit("processes"), ["4096", "4096"]);
    assert_eq!(status_field(&text, "Uid"), [id.as_str(); 4].join(" "));
    assert_eq!(status_field(&text, "Gid"), [id.as_str(); 4].join(" "));
    assert_eq!(status_field(&text, "Groups"), "", "no supplementary group");
    for key in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(status_field(&text, key), "0000000000000000", "{key}");
    }
    assert!(text.contains(&format!("made {id}:{id}")), "{text}");
    assert!(text.contains("umask 0007"), "{text}");
    assert!(text.contains("env none"), "{text}");
    assert!(!text.contains("wrote-root-file"), "{text}");
}

#[test]
fn a_program_that_switches_itself_starts_with_only_the_power_to_switch() {
    if !is_root() {
        eprintln!("skipped: the jail needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let who = boxlet::jail::Identity {
        id: boxlet::jail::VM_IDS.0 + 4243,
    };
    let text = run_as(
        dir.path(),
        boxlet::jail::RunAs::VmAfterSetup(who),
        "cat /proc/self/status; echo env ${BOXLET_RUN_AS:-none}",
    );
    let id = who.id.to_string();
    // Root's ids with the VM's group, and only CAP_SETGID and CAP_SETUID.
    assert!(status_field(&text, "Uid").starts_with("0 0 0"), "{text}");
    assert_eq!(status_field(&text, "Groups"), id);
    assert_eq!(status_field(&text, "CapEff"), "00000000000000c0");
    assert_eq!(status_field(&text, "CapBnd"), "00000000000000c0");
    assert!(text.contains(&format!("env {id}:{id}")), "{text}");
}

#[test]
fn no_two_live_leases_share_an_identity_and_a_dropped_one_frees_its_slot() {
    let dir = tempfile::tempdir().unwrap();
    let ids = dir.path().join("ids");
    let a = boxlet::jail::IdentityLease::take_in(&ids).unwrap();
    let b = boxlet::jail::IdentityLease::take_in(&ids).unwrap();
    let (ia, ib) = (a.identity().id, b.identity().id);
    assert_ne!(ia, ib);
    for id in [ia, ib] {
        assert!(
            (boxlet::jail::VM_IDS.0..boxlet::jail::VM_IDS.0 + boxlet::jail::VM_IDS.1).contains(&id)
        );
    }
    // A's slot is locked while A lives, free once it is dropped.
    let slot = ids.join((ia - boxlet::jail::VM_IDS.0).to_string());
    let try_lock = || {
        let f = std::fs::File::open(&slot).unwrap();
        rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok()
    };
    assert!(!try_lock(), "a live lease's slot is locked");
    drop(a);
    assert!(try_lock(), "a dropped lease's slot is free");
    // The lease directory is private.
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&ids).unwrap().permissions().mode() & 0o777,
        0o700
    );
}

#[test]
fn handing_a_directory_over_follows_no_link_out_of_it() {
    if !is_root() {
        eprintln!("skipped: changing owners needs root");
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside");
    std::fs::write(&outside, b"host").unwrap();
    let vm = dir.path().join("vm");
    std::fs::create_dir(&vm).unwrap();
    std::fs::write(vm.join("sock"), b"").unwrap();
    std::os::unix::fs::symlink(&outside, vm.join("link")).unwrap();
    let who = boxlet::jail::Identity {
        id: boxlet::jail::VM_IDS.0 + 9,
    };
    boxlet::jail::hand_over(&vm, who).unwrap();
    let meta = std::fs::symlink_metadata(&vm).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid(), meta.mode() & 0o7777),
        (who.id, who.id, 0o770)
    );
    assert_eq!(std::fs::metadata(vm.join("sock")).unwrap().uid(), who.id);
    assert_eq!(
        std::fs::symlink_metadata(vm.join("link")).unwrap().uid(),
        who.id
    );
    assert_eq!(
        std::fs::metadata(&outside).unwrap().uid(),
        0,
        "the link's target is untouched"
    );
    // A symbolic link in place of the directory itself is refused, not followed.
    let swapped = dir.path().join("swapped");
    std::os::unix::fs::symlink(dir.path().join("outside"), &swapped).unwrap();
    assert!(boxlet::jail::hand_over(&swapped, who).is_err());
    assert_eq!(std::fs::metadata(&outside).unwrap().uid(), 0);
}

#[test]
fn a_program_that_changed_its_ids_dies_with_its_jails_outer_process() {
    if !is_root() {
        eprintln!("skipped: the jail needs root");
        return;
    }
    // Changing ids clears a process's parent-death signal: the jail's init (PID 1 of
    // its namespace, which keeps root's ids) is what takes the program down.
    let dir = tempfile::tempdir().unwrap();
    let who = boxlet::jail::Identity {
        id: boxlet::jail::VM_IDS.0 + 4244,
    };
    let jailer = boxlet::jail::Jailer::Helper(env!("CARGO_BIN_EXE_boxlet-jail").into());
    let mut binds = system_binds();
    binds.push(Bind::rw(dir.path()));
    let mut spec = JailSpec::new(dir.path().join("root"), binds);
    spec.run_as = boxlet::jail::RunAs::Vm(who);
    // (A leftover, should this fail, ends on its own within ten minutes.)
    let marker = format!("600.{}", std::process::id());
    let mut cmd = tokio::process::Command::new("/bin/sleep");
    cmd.arg(&marker);
    let mut outer = jailer
        .wrap(spec, cmd)
        .unwrap()
        .as_std_mut()
        .spawn()
        .unwrap();
    let sleeping = || {
        std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                // The program itself, not the outer process (whose arguments end
                // the same).
                let argv: Vec<&[u8]> = c.split(|&b| b == 0).collect();
                argv.len() == 3 && argv[0].ends_with(b"/sleep") && argv[1] == marker.as_bytes()
            })
        })
    };
    let mut waited = 0;
    while !sleeping() {
        assert!(waited < 500, "the jailed program never started");
        std::thread::sleep(std::time::Duration::from_millis(10));
        waited += 1;
    }
    outer.kill().unwrap();
    outer.wait().unwrap();
    let mut waited = 0;
    while sleeping() {
        assert!(
            waited < 500,
            "the program outlived its jail's outer process"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
        waited += 1;
    }
}

#[test]
fn a_stop_reaches_a_program_that_runs_as_the_vms_identity() {
    if !is_root() {
        eprintln!("skipped: the jail needs root");
        return;
    }
    // SIGTERM to the outer process goes through the jail's init (root's ids, CAP_KILL
    // alone) to a program with other ids: a VMM that is asked to stop can flush its disks.
    let dir = tempfile::tempdir().unwrap();
    let jailer = boxlet::jail::Jailer::Helper(env!("CARGO_BIN_EXE_boxlet-jail").into());
    let mut binds = system_binds();
    binds.push(Bind::rw(dir.path()));
    let mut spec = JailSpec::new(dir.path().join("root"), binds);
    spec.run_as = boxlet::jail::RunAs::Vm(boxlet::jail::Identity {
        id: boxlet::jail::VM_IDS.0 + 4245,
    });
    use std::os::unix::fs::PermissionsExt;
    // Where the program (not root) says it is up.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let ready = dir.path().join("ready");
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.args([
        "-c",
        "trap 'exit 7' TERM; : > \"$0\"; while :; do sleep 0.1; done",
    ])
    .arg(&ready);
    let mut outer = jailer
        .wrap(spec, cmd)
        .unwrap()
        .as_std_mut()
        .spawn()
        .unwrap();
    let mut waited = 0;
    while !ready.exists() {
        assert!(waited < 500, "the jailed program never started");
        std::thread::sleep(std::time::Duration::from_millis(10));
        waited += 1;
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(outer.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    for _ in 0..500 {
        if let Some(status) = outer.try_wait().unwrap() {
            assert_eq!(status.code(), Some(7), "{status:?}");
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    outer.kill().unwrap();
    panic!("the program never got the SIGTERM");
}

/// Run the perl `script` in a jail made by `adjust` from a spec of the system's binds.
fn perl_jailed(adjust: impl FnOnce(&mut JailSpec), script: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    perl_jailed_in(dir.path(), adjust, script)
}

#[test]
fn a_vmm_or_daemon_may_execute_nothing_but_itself() {
    if !is_root() {
        eprintln!("skipped: the jail needs root");
        return;
    }
    // SAFETY: landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION) only
    // asks for the ABI version.
    let abi = unsafe { nix::libc::syscall(444, std::ptr::null::<u8>(), 0usize, 1u32) };
    if abi < 1 {
        eprintln!("skipped: this kernel has no Landlock");
        return;
    }
    let script = "exec(q(/usr/bin/true)) or print qq(refused: $!\\n)";
    // perl itself runs (the program, through its ELF interpreter), and may not start
    // another program.
    let out = perl_jailed(|s| s.exec_only_program = true, script);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "refused: Permission denied\n",
        "{out:?}"
    );
    // Without the rule the same exec runs.
    let out = perl_jailed(|_| {}, script);
    assert!(out.status.success() && out.stdout.is_empty(), "{out:?}");
}

#[test]
fn nothing_jailed_reaches_a_keyring() {
    if !is_root() {
        eprintln!("skipped: the jail needs root");
        return;
    }
    // keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_USER_KEYRING, 0): the keyring of the ids,
    // which outlives the process (and a VM's slot is given to later VMs).
    let out = perl_jailed(|_| {}, "$r = syscall(250, 0, -4, 0); print qq(r=$r $!\\n)");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "r=-1 Operation not permitted\n",
        "{out:?}"
    );
    // Nor through its x32 number (bit 30 set), which a list of x86-64 numbers would not
    // see: refused with EPERM before the kernel says whether it has x32 at all (ENOSYS
    // where it has not; the key where it has).
    let out = perl_jailed(
        |_| {},
        "$r = syscall(0x40000000 | 250, 0, -4, 0); print qq(r=$r $!\\n)",
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "r=-1 Operation not permitted\n",
        "{out:?}"
    );
}

#[test]
fn a_disk_whose_backing_chain_was_rewritten_is_refused_until_its_owner_says_so() {
    use boxlet::DiskFormat::{Qcow2, Raw};
    use boxlet_qcow2::{create, BackingFormat, CreateOptions};
    let dir = tempfile::tempdir().unwrap();
    let (base, secret) = (dir.path().join("base.raw"), dir.path().join("secret.raw"));
    std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&secret, vec![7u8; 1 << 20]).unwrap();
    let disk = dir.path().join("box.qcow2");
    create(
        &disk,
        &CreateOptions::overlay("base.raw", BackingFormat::Raw),
    )
    .unwrap();
    let real = |p: &Path| std::fs::canonicalize(p).unwrap();
    let chain = |writable| boxlet::jail::backing_chain(&disk, Qcow2, writable);
    // The first boot records the format and chain beside the disk.
    assert_eq!(chain(true).unwrap(), [real(&base)]);
    let pin = boxlet::jail::pin_path(&disk);
    assert!(std::fs::read_to_string(&pin)
        .unwrap()
        .ends_with(&format!("Qcow2\n{}\n", real(&base).display())));
    assert_eq!(chain(true).unwrap(), [real(&base)]);
    // A VMM rewrites the header in place (same file) to name another file: refused,
    // naming the record, writable or not.
    let forged = dir.path().join("forged.qcow2");
    create(
        &forged,
        &CreateOptions::overlay("secret.raw", BackingFormat::Raw),
    )
    .unwrap();
    std::fs::write(&disk, std::fs::read(&forged).unwrap()).unwrap();
    for writable in [true, false] {
        let e = chain(writable).unwrap_err().to_string();
        assert!(
            e.contains("secret.raw") && e.contains(&pin.display().to_string()),
            "{e}"
        );
    }
    // Its owner says so (the record removed): recorded afresh.
    std::fs::remove_file(&pin).unwrap();
    assert_eq!(chain(true).unwrap(), [real(&secret)]);
    // A new file at the path (what no VM can make: a jail binds the file, never its
    // directory) is a new disk, recorded afresh.
    std::fs::remove_file(&disk).unwrap();
    create(
        &disk,
        &CreateOptions::overlay("base.raw", BackingFormat::Raw),
    )
    .unwrap();
    assert_eq!(chain(true).unwrap(), [real(&base)]);

    // A raw disk whose guest wrote a qcow2 header naming a host file into its first
    // sector: the next boot would take it for a qcow2 overlay of that file. Its record
    // says raw.
    let raw = dir.path().join("root.img");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    assert!(boxlet::jail::backing_chain(&raw, Raw, true)
        .unwrap()
        .is_empty());
    let header = std::fs::read(&forged).unwrap();
    let mut bytes = std::fs::read(&raw).unwrap();
    bytes[..header.len()].copy_from_slice(&header);
    std::fs::write(&raw, &bytes).unwrap();
    assert_eq!(boxlet::DiskFormat::detect(&raw).unwrap(), Qcow2);
    let e = boxlet::jail::backing_chain(&raw, Qcow2, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("Raw") && e.contains("secret.raw"), "{e}");
    // Read as raw (its recorded format), nothing in it is followed.
    assert!(boxlet::jail::backing_chain(&raw, Raw, true)
        .unwrap()
        .is_empty());

    // A record that is not this user's regular file is refused, not followed.
    let other = dir.path().join("other.qcow2");
    create(
        &other,
        &CreateOptions::overlay("base.raw", BackingFormat::Raw),
    )
    .unwrap();
    std::os::unix::fs::symlink(&pin, boxlet::jail::pin_path(&other)).unwrap();
    let e = boxlet::jail::backing_chain(&other, Qcow2, true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("other.qcow2.boxlet-chain"), "{e}");
}
