//! The iptables applier against real iptables binaries inside network
//! namespaces (both backends), plus failure cases through fake scripts.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kproxy_iptables::runner::{
    parse_save, Backend, BackendPreference, Iptables, IptablesError, JumpRule, Position,
    StdinSource, SystemCommandRunner,
};
use kproxy_model::IpFamily;
use kproxy_testkit::netns::{skip_unless_root, Netns};

const GOOD: &str = "*nat
:KUBE-SERVICES - [0:0]
:KUBE-SVC-TEST - [0:0]
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment \"ns/svc:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-TEST
-A KUBE-SVC-TEST -p tcp -j DNAT --to-destination 10.244.1.10:8080
COMMIT
*filter
:KUBE-FORWARD - [0:0]
-A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP
COMMIT
";

fn backends() -> [Backend; 2] {
    [Backend::Legacy, Backend::Nft]
}

#[test]
fn restore_installs_rules() {
    if skip_unless_root("restore_installs_rules") {
        return;
    }
    for backend in backends() {
        let ns = Netns::create(&format!("rst-{backend}")).unwrap();
        let ipt = Iptables::new(IpFamily::V4, backend);
        let outcome = ns.run_in(|| ipt.restore(GOOD)).unwrap().unwrap();
        assert!(outcome.duration > Duration::ZERO);
        assert_eq!(outcome.lock_wait, None);

        let nat = parse_save(&ns.run_in(|| ipt.save("nat")).unwrap().unwrap());
        assert_eq!(
            nat.chains["KUBE-SERVICES"],
            vec!["-d 10.96.0.10/32 -p tcp -m comment --comment \"ns/svc:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-TEST"],
            "{backend}"
        );
        assert_eq!(
            nat.chains["KUBE-SVC-TEST"],
            vec!["-p tcp -j DNAT --to-destination 10.244.1.10:8080"]
        );
        let filter = parse_save(&ns.run_in(|| ipt.save("filter")).unwrap().unwrap());
        assert_eq!(
            filter.chains["KUBE-FORWARD"],
            vec!["-m conntrack --ctstate INVALID -j DROP"]
        );
        // Cross-check with the plain tool, independent of our parser.
        let save = ns
            .exec_ok([
                format!("iptables-{backend}-save"),
                "-t".into(),
                "nat".into(),
            ])
            .unwrap();
        assert!(
            save.contains("-p tcp -j DNAT --to-destination 10.244.1.10:8080"),
            "{save}"
        );

        assert!(ns
            .run_in(|| ipt.chain_exists("nat", "KUBE-SVC-TEST"))
            .unwrap()
            .unwrap());
        assert!(!ns
            .run_in(|| ipt.chain_exists("nat", "KUBE-NOPE"))
            .unwrap()
            .unwrap());

        // --noflush: a second restore that touches only one chain rewrites
        // that chain and leaves the others alone.
        ns.run_in(|| {
            ipt.restore("*nat\n:KUBE-SVC-TEST - [0:0]\n-A KUBE-SVC-TEST -p tcp -j DNAT --to-destination 10.244.1.11:8080\nCOMMIT\n")
        })
        .unwrap()
        .unwrap();
        let nat = parse_save(&ns.run_in(|| ipt.save("nat")).unwrap().unwrap());
        assert_eq!(
            nat.chains["KUBE-SVC-TEST"],
            vec!["-p tcp -j DNAT --to-destination 10.244.1.11:8080"]
        );
        assert_eq!(nat.chains["KUBE-SERVICES"].len(), 1);
    }
}

#[test]
fn restore_failure_names_the_line_and_keeps_previous_rules() {
    if skip_unless_root("restore_failure_names_the_line_and_keeps_previous_rules") {
        return;
    }
    for backend in backends() {
        let ns = Netns::create(&format!("bad-{backend}")).unwrap();
        let ipt = Iptables::new(IpFamily::V4, backend);
        ns.run_in(|| ipt.restore(GOOD)).unwrap().unwrap();
        let before = ns.exec_ok([format!("iptables-{backend}-save")]).unwrap();

        // Line 5 is refused by the parser (a port out of range).
        let bad = "*nat
:KUBE-SVC-TEST - [0:0]
:KUBE-NEW - [0:0]
-A KUBE-SVC-TEST -p tcp -j DNAT --to-destination 10.244.1.99:8080
-A KUBE-NEW -p tcp --dport 99999 -j RETURN
COMMIT
";
        let err = ns.run_in(|| ipt.restore(bad)).unwrap().unwrap_err();
        let line = err.failed_line().expect("line reported");
        assert_eq!(line.number, 5, "{backend}: {err}");
        assert_eq!(line.text, "-A KUBE-NEW -p tcp --dport 99999 -j RETURN");
        match &err {
            IptablesError::Failed { code, stderr, .. } => {
                assert_eq!(*code, Some(2));
                assert!(stderr.contains("99999"), "{stderr}");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("line 5"), "{err}");

        // A jump to a chain that does not exist: legacy refuses the line,
        // nft refuses the COMMIT; both must point at the jump.
        let bad = "*filter
:KUBE-FORWARD - [0:0]
-A KUBE-FORWARD -j ACCEPT
-A KUBE-FORWARD -j KUBE-DOES-NOT-EXIST
COMMIT
";
        let err = ns.run_in(|| ipt.restore(bad)).unwrap().unwrap_err();
        let line = err.failed_line().expect("line reported");
        assert_eq!(line.number, 4, "{backend}: {err}");
        assert_eq!(line.text, "-A KUBE-FORWARD -j KUBE-DOES-NOT-EXIST");

        let after = ns.exec_ok([format!("iptables-{backend}-save")]).unwrap();
        assert_eq!(strip_comments(&before), strip_comments(&after), "{backend}");
    }
}

/// iptables-save's `#` lines carry timestamps.
fn strip_comments(save: &str) -> String {
    save.lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn ensure_jump_rules_is_idempotent() {
    if skip_unless_root("ensure_jump_rules_is_idempotent") {
        return;
    }
    for backend in backends() {
        for family in IpFamily::ALL {
            let ns = Netns::create(&format!("jump-{backend}")).unwrap();
            let ipt = Iptables::new(family, backend);
            let tool = match family {
                IpFamily::V4 => format!("iptables-{backend}"),
                IpFamily::V6 => format!("ip6tables-{backend}"),
            };
            ns.run_in(|| {
                ipt.restore("*nat\n:KUBE-SERVICES - [0:0]\nCOMMIT\n*filter\n:KUBE-FORWARD - [0:0]\nCOMMIT\n")
            })
            .unwrap()
            .unwrap();
            // A foreign rule already first in PREROUTING.
            ns.exec_ok([
                &tool,
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-p",
                "udp",
                "-j",
                "RETURN",
            ])
            .unwrap();
            let rules = [
                JumpRule {
                    table: "nat".into(),
                    chain: "PREROUTING".into(),
                    position: Position::Prepend,
                    rulespec: vec![
                        "-m".into(),
                        "comment".into(),
                        "--comment".into(),
                        "kubernetes service portals".into(),
                        "-j".into(),
                        "KUBE-SERVICES".into(),
                    ],
                },
                JumpRule {
                    table: "filter".into(),
                    chain: "FORWARD".into(),
                    position: Position::Append,
                    rulespec: vec!["-j".into(), "KUBE-FORWARD".into()],
                },
            ];
            assert_eq!(
                ns.run_in(|| ipt.ensure_jump_rules(&rules))
                    .unwrap()
                    .unwrap(),
                2
            );
            assert_eq!(
                ns.run_in(|| ipt.ensure_jump_rules(&rules))
                    .unwrap()
                    .unwrap(),
                0
            );
            let nat = parse_save(&ns.run_in(|| ipt.save("nat")).unwrap().unwrap());
            assert_eq!(
                nat.chains["PREROUTING"],
                vec![
                    "-m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
                    "-p udp -j RETURN"
                ],
                "{backend} {family}"
            );
            let filter = parse_save(&ns.run_in(|| ipt.save("filter")).unwrap().unwrap());
            assert_eq!(filter.chains["FORWARD"], vec!["-j KUBE-FORWARD"]);

            // A jump to a missing chain creates it (empty) first, so jumps
            // can go in before the restore that fills their targets.
            let missing = [JumpRule {
                table: "nat".into(),
                chain: "OUTPUT".into(),
                position: Position::Prepend,
                rulespec: vec!["-j".into(), "KUBE-MISSING".into()],
            }];
            assert_eq!(
                ns.run_in(|| ipt.ensure_jump_rules(&missing))
                    .unwrap()
                    .unwrap(),
                1
            );
            let nat = parse_save(&ns.run_in(|| ipt.save("nat")).unwrap().unwrap());
            assert_eq!(nat.chains["OUTPUT"], vec!["-j KUBE-MISSING"]);
            assert!(nat.chains["KUBE-MISSING"].is_empty());

            assert!(!ns
                .run_in(|| ipt.ensure_chain("nat", "KUBE-SERVICES"))
                .unwrap()
                .unwrap());
            assert!(ns
                .run_in(|| ipt.ensure_chain("nat", "KUBE-NEW"))
                .unwrap()
                .unwrap());
            assert!(ns
                .run_in(|| ipt.chain_exists("nat", "KUBE-NEW"))
                .unwrap()
                .unwrap());
        }
    }
}

#[test]
fn ipv6_restore() {
    if skip_unless_root("ipv6_restore") {
        return;
    }
    let ns = Netns::create("rst6").unwrap();
    let ipt = Iptables::detect(IpFamily::V6, BackendPreference::Nft).unwrap();
    assert_eq!(ipt.restore_program(), "ip6tables-nft-restore");
    ns.run_in(|| {
        ipt.restore("*nat\n:KUBE-SVC-6 - [0:0]\n-A KUBE-SVC-6 -p tcp -j DNAT --to-destination [fd00:10:244:1::10]:8080\nCOMMIT\n")
    })
    .unwrap()
    .unwrap();
    let nat = parse_save(&ns.run_in(|| ipt.save("nat")).unwrap().unwrap());
    assert_eq!(
        nat.chains["KUBE-SVC-6"],
        vec!["-p tcp -j DNAT --to-destination [fd00:10:244:1::10]:8080"]
    );
}

/// Holds the (private) xtables lock while a legacy restore runs: the
/// restore waits, succeeds, and reports the wait; with a short timeout it
/// fails with a lock error.
#[test]
fn legacy_lock_wait_is_reported() {
    if skip_unless_root("legacy_lock_wait_is_reported") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lock_path = dir.path().join("xtables.lock");
    let lock = std::fs::File::create(&lock_path).unwrap();
    let runner = Arc::new(SystemCommandRunner::new().with_env("XTABLES_LOCKFILE", &lock_path));
    let ipt = Iptables::with_runner(IpFamily::V4, Backend::Legacy, runner);
    let ns = Netns::create("lock").unwrap();

    lock.lock().unwrap();
    let outcome = std::thread::scope(|s| {
        let h = s.spawn(|| ns.run_in(|| ipt.restore("*filter\n:KUBE-A - [0:0]\nCOMMIT\n")));
        std::thread::sleep(Duration::from_millis(700));
        lock.unlock().unwrap();
        h.join().unwrap()
    })
    .unwrap()
    .unwrap();
    let waited = outcome.lock_wait.expect("lock wait reported");
    assert!(waited >= Duration::from_millis(500), "{waited:?}");

    // Uncontended: no wait reported.
    let outcome = ns
        .run_in(|| ipt.restore("*filter\n:KUBE-B - [0:0]\nCOMMIT\n"))
        .unwrap()
        .unwrap();
    assert_eq!(outcome.lock_wait, None);

    // Held for longer than the timeout: a lock error, nothing applied.
    let ipt = ipt.with_lock_timeout(1);
    lock.lock().unwrap();
    let err = ns
        .run_in(|| ipt.restore("*filter\n:KUBE-C - [0:0]\nCOMMIT\n"))
        .unwrap()
        .unwrap_err();
    lock.unlock().unwrap();
    assert!(err.is_lock_timeout(), "{err}");
    assert!(!ns
        .run_in(|| ipt.chain_exists("filter", "KUBE-C"))
        .unwrap()
        .unwrap());
}

fn script(dir: &Path, name: &str, body: &str) {
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    writeln!(f, "#!/bin/sh\n{body}").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn fake_restore_failure_and_lock_message() {
    let dir = tempfile::tempdir().unwrap();
    script(
        dir.path(),
        "iptables-nft-restore",
        "cat > \"$(dirname \"$0\")/input\"\necho 'iptables-nft-restore: line 3 failed: Invalid argument' >&2\nexit 1",
    );
    script(
        dir.path(),
        "iptables-nft",
        "echo 'iptables v1.8.11 (nf_tables)'",
    );
    let runner = Arc::new(SystemCommandRunner::new().with_bin_dir(dir.path()));
    let ipt = Iptables::with_runner(IpFamily::V4, Backend::Nft, runner.clone());
    let text = "*nat\n:A - [0:0]\n-A A -j BROKEN\nCOMMIT\n";
    let err = ipt.restore(text).unwrap_err();
    assert_eq!(
        err.failed_line().map(|l| (l.number, l.text.as_str())),
        Some((3, "-A A -j BROKEN"))
    );
    // The text went to stdin verbatim, with the documented flags.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("input")).unwrap(),
        text
    );
    match err {
        IptablesError::Failed { args, code, .. } => {
            assert_eq!(code, Some(1));
            assert_eq!(args, vec!["--noflush", "--counters", "--wait=5"]);
        }
        other => panic!("{other:?}"),
    }

    // Input written on demand (no text held) reaches stdin the same, and the
    // refused line is found by writing it again.
    struct Lines(&'static [&'static str]);
    impl StdinSource for Lines {
        fn write_to(&self, w: &mut dyn Write) -> std::io::Result<()> {
            for l in self.0 {
                w.write_all(l.as_bytes())?;
                w.write_all(b"\n")?;
            }
            Ok(())
        }
    }
    let lines = Lines(&["*nat", ":A - [0:0]", "-A A -j BROKEN", "COMMIT"]);
    let err = ipt.restore_from(&lines).unwrap_err();
    assert_eq!(
        err.failed_line().map(|l| (l.number, l.text.as_str())),
        Some((3, "-A A -j BROKEN"))
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("input")).unwrap(),
        text
    );

    // A restore that succeeded after printing the lock message reports a wait.
    script(
        dir.path(),
        "iptables-nft-restore",
        "cat >/dev/null\necho 'Another app is currently holding the xtables lock. Waiting (1s) for it to exit...' >&2\nexit 0",
    );
    let outcome = ipt.restore(text).unwrap();
    assert!(outcome.lock_wait.is_some());
}

#[test]
fn fake_wait_interval_only_for_old_versions() {
    let dir = tempfile::tempdir().unwrap();
    script(
        dir.path(),
        "iptables-legacy-restore",
        "cat >/dev/null\necho \"$@\" > \"$(dirname \"$0\")/args\"",
    );
    script(dir.path(), "iptables-legacy", "echo 'iptables v1.6.2'");
    let runner = Arc::new(SystemCommandRunner::new().with_bin_dir(dir.path()));
    let ipt = Iptables::with_runner(IpFamily::V4, Backend::Legacy, runner);
    ipt.restore("*nat\nCOMMIT\n").unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.path().join("args"))
            .unwrap()
            .trim(),
        "--noflush --counters --wait=5 --wait-interval 100000"
    );
}

#[test]
fn fake_detection() {
    // Nothing installed: a clear error.
    let empty = tempfile::tempdir().unwrap();
    let runner = Arc::new(SystemCommandRunner::new().with_bin_dir(empty.path()));
    let err =
        Iptables::detect_with_runner(IpFamily::V4, BackendPreference::Auto, runner).unwrap_err();
    assert!(matches!(err, IptablesError::NotFound(_)));
    assert!(err.to_string().contains("iptables-restore"), "{err}");

    // Only the plain binaries: their --version decides.
    let plain = tempfile::tempdir().unwrap();
    script(plain.path(), "iptables-restore", "exit 0");
    script(plain.path(), "iptables", "echo 'iptables v1.8.7 (legacy)'");
    let runner = Arc::new(SystemCommandRunner::new().with_bin_dir(plain.path()));
    let ipt = Iptables::detect_with_runner(IpFamily::V4, BackendPreference::Auto, runner.clone())
        .unwrap();
    assert_eq!(
        (ipt.backend(), ipt.restore_program().as_str()),
        (Backend::Legacy, "iptables-restore")
    );
    let ipt = Iptables::detect_with_runner(IpFamily::V4, BackendPreference::Legacy, runner.clone())
        .unwrap();
    assert_eq!(ipt.backend(), Backend::Legacy);
    assert!(Iptables::detect_with_runner(IpFamily::V4, BackendPreference::Nft, runner).is_err());

    // Both installed: the backend holding KUBE- chains wins even with fewer
    // rules; kubelet's hint in mangle wins over everything.
    let both = tempfile::tempdir().unwrap();
    for b in ["legacy", "nft"] {
        script(both.path(), &format!("iptables-{b}-restore"), "exit 0");
        script(both.path(), &format!("ip6tables-{b}-restore"), "exit 0");
    }
    script(
        both.path(),
        "iptables-legacy-save",
        "printf '*nat\\n:KUBE-SERVICES - [0:0]\\n-A KUBE-SERVICES -j RETURN\\nCOMMIT\\n'",
    );
    script(both.path(), "iptables-nft-save", "printf '*filter\\n-A INPUT -j ACCEPT\\n-A INPUT -j ACCEPT\\n-A INPUT -j ACCEPT\\nCOMMIT\\n'");
    let runner = Arc::new(SystemCommandRunner::new().with_bin_dir(both.path()));
    let ipt = Iptables::detect_with_runner(IpFamily::V6, BackendPreference::Auto, runner.clone())
        .unwrap();
    assert_eq!(
        (ipt.backend(), ipt.restore_program().as_str()),
        (Backend::Legacy, "ip6tables-legacy-restore")
    );
    script(
        both.path(),
        "ip6tables-nft-save",
        "printf '*mangle\\n:KUBE-IPTABLES-HINT - [0:0]\\nCOMMIT\\n'",
    );
    let ipt = Iptables::detect_with_runner(IpFamily::V4, BackendPreference::Auto, runner.clone())
        .unwrap();
    assert_eq!(ipt.backend(), Backend::Nft);
    // An explicit preference is obeyed.
    let ipt =
        Iptables::detect_with_runner(IpFamily::V4, BackendPreference::Legacy, runner).unwrap();
    assert_eq!(ipt.backend(), Backend::Legacy);
}
