//! `boxlet run IMAGE -- CMD` end to end on the QEMU backend, with each strategy: the
//! image's environment applied, stdin in, output and the exit code out, and nothing of
//! the box left afterwards. Needs `make setup` and BOXLET_AGENT (`make test` sets it).

mod common;

use common::boxlet as run;

fn home_with_busybox() -> tempfile::TempDir {
    assert!(
        std::env::var_os("BOXLET_AGENT").is_some(),
        "BOXLET_AGENT: `make test` sets it"
    );
    let home = tempfile::tempdir().unwrap();
    let layout = boxlet_testkit::busybox_image().join("layout");
    let out = run(
        home.path(),
        &["import", layout.to_str().unwrap(), "--name", "busybox:1"],
        "",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    home
}

#[test]
fn a_command_runs_in_a_box_of_each_strategy_and_the_box_goes_away() {
    let home = home_with_busybox();
    for strategy in ["disk", "extracted", "overlay"] {
        let out = run(
            home.path(),
            &[
                "run",
                "--backend",
                "qemu",
                "--strategy",
                strategy,
                "busybox:1",
                "--",
                "sh",
                "-c",
                "cat /etc/hostname; echo $PATH; cat; exit 3",
            ],
            "from stdin\n",
        );
        assert_eq!(
            out.status.code(),
            Some(3),
            "{strategy}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "boxlet\n/usr/sbin:/usr/bin:/sbin:/bin\nfrom stdin\n",
            "{strategy}"
        );
        let boxes = std::fs::read_dir(home.path().join("boxes"))
            .unwrap()
            .count();
        assert_eq!(boxes, 0, "{strategy}: the box's directory stayed");
    }
    let du = run(home.path(), &["store", "du", "--json"], "");
    let du: serde_json::Value = serde_json::from_slice(&du.stdout).unwrap();
    assert_eq!(du["boxes"], 0, "box records stayed");

    // The image goes: `store gc` takes what the three strategies cached for it.
    let entries = |d: &str| std::fs::read_dir(home.path().join(d)).map_or(0, |e| e.count());
    // (layers/: the image's two layers, each with its usage record)
    assert_eq!(
        (entries("images"), entries("layers"), entries("bases")),
        (1, 4, 2)
    );
    assert!(run(home.path(), &["rmi", "busybox:1"], "").status.success());
    let gc = run(home.path(), &["store", "gc", "--json"], "");
    let gc: serde_json::Value = serde_json::from_slice(&gc.stdout).unwrap();
    let c = &gc["caches"];
    assert_eq!(
        (&c["trees"], &c["layers"], &c["image_disks"], &c["bases"]),
        (&1.into(), &2.into(), &1.into(), &1.into()),
        "{gc}"
    );
    assert_eq!(
        (entries("images"), entries("layers"), entries("bases")),
        (0, 0, 0)
    );
    let du = run(home.path(), &["store", "du", "--json"], "");
    let du: serde_json::Value = serde_json::from_slice(&du.stdout).unwrap();
    assert_eq!(
        (&du["blobs"], &du["base_disks"]),
        (&0.into(), &0.into()),
        "{du}"
    );
}

#[test]
fn the_image_command_runs_when_none_is_given_and_bad_requests_are_clear_errors() {
    let home = home_with_busybox();
    // The image's command is /bin/sh: it reads its script from stdin.
    let out = run(
        home.path(),
        &["run", "--backend", "qemu", "busybox:1"],
        "echo from the image cmd\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from the image cmd\n");

    let missing = run(home.path(), &["run", "nothing:here", "--", "true"], "");
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nothing:here"));

    // One runtime per home: a held lock is named with its holder.
    let _held = boxlet::rootfs::RuntimeLock::acquire(home.path()).unwrap();
    let locked = run(home.path(), &["run", "busybox:1", "--", "true"], "");
    assert!(!locked.status.success());
    let err = String::from_utf8_lossy(&locked.stderr);
    assert!(
        err.contains(&std::process::id().to_string()) && err.contains(".lock"),
        "{err}"
    );
}

#[test]
fn exit_codes_follow_dockers() {
    let home = home_with_busybox();
    let code = |args: &[&str]| {
        let mut all = vec!["run", "--backend", "qemu"];
        all.extend_from_slice(args);
        let out = run(home.path(), &all, "");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The command's own; 128 + N for a signal.
    assert_eq!(
        code(&["busybox:1", "--", "sh", "-c", "exit 42"]).0,
        Some(42)
    );
    assert_eq!(
        code(&["busybox:1", "--", "sh", "-c", "kill -9 $$"]).0,
        Some(137)
    );
    // 127: not found; 126: there but not executable; each named.
    let (c, err) = code(&["busybox:1", "--", "/no/such/program"]);
    assert_eq!(c, Some(127), "{err}");
    assert!(err.contains("/no/such/program: command not found"), "{err}");
    let (c, err) = code(&["busybox:1", "--", "/etc/passwd"]);
    assert_eq!(c, Some(126), "{err}");
    assert!(err.contains("/etc/passwd: permission denied"), "{err}");
    // 125: boxlet's own failure: no such image, a bad option.
    let (c, err) = code(&["nosuch:1", "--", "true"]);
    assert_eq!(c, Some(125), "{err}");
    assert!(err.contains("nosuch:1"), "{err}");
    assert_eq!(
        code(&["--no-such-option", "busybox:1", "--", "true"]).0,
        Some(125)
    );
    // Help is not a failure.
    let help = run(home.path(), &["run", "--help"], "");
    assert_eq!(help.status.code(), Some(0));
}
