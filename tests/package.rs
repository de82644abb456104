//! The Debian package (`scripts/package`, cargo-deb): it holds the binary,
//! both units, the example configs as conffiles, the dashboard, man pages
//! and completions; unpacked into a throwaway root, its binary runs, its
//! example configs pass `config check`, `banmesh demo` works and its
//! units pass `systemd-analyze verify`; removing it keeps configs and data (only a purge touches them).
mod common;

use std::{path::Path, process::Command};

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?}: {said}");
    said
}

#[test]
fn the_deb_holds_what_a_server_needs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // cargo test built the binary; a nested cargo build would wait on its lock.
    let said = run(Command::new(root.join("scripts/package")).args(["--dev", "--no-build"]));
    let deb = said.lines().last().unwrap().trim().to_string();
    assert!(deb.ends_with(".deb"), "{said}");

    let list = run(Command::new("dpkg-deb").args(["-c", &deb]));
    for path in [
        "./usr/bin/banmesh",
        "./usr/lib/systemd/system/banmesh-hub.service",
        "./usr/lib/systemd/system/banmesh-node.service",
        "./etc/banmesh/hub.toml",
        "./etc/banmesh/node.toml",
        "./usr/share/banmesh/grafana/banmesh.json",
        "./usr/share/man/man1/banmesh.1.gz",
        "./usr/share/man/man1/banmesh-hub.1.gz",
        "./usr/share/bash-completion/completions/banmesh",
        "./usr/share/zsh/vendor-completions/_banmesh",
    ] {
        assert!(
            list.lines().any(|l| l.ends_with(path)),
            "{path} not in the package:\n{list}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let control = dir.path().join("DEBIAN");
    run(Command::new("dpkg-deb").args(["-e", &deb]).arg(&control));
    let conffiles = std::fs::read_to_string(control.join("conffiles")).unwrap();
    assert!(
        conffiles.lines().any(|l| l == "/etc/banmesh/hub.toml"),
        "{conffiles}"
    );
    assert!(
        conffiles.lines().any(|l| l == "/etc/banmesh/node.toml"),
        "{conffiles}"
    );
    let postinst = std::fs::read_to_string(control.join("postinst")).unwrap();
    assert!(
        postinst.contains("adduser --system"),
        "the hub's user is made:\n{postinst}"
    );
    // Removal keeps configs and data: no maintainer script deletes them.
    for script in ["postrm", "prerm"] {
        let text = std::fs::read_to_string(control.join(script)).unwrap_or_default();
        for kept in ["/etc/banmesh", "/var/lib/banmesh"] {
            assert!(!text.contains(kept), "{script} touches {kept}:\n{text}");
        }
    }

    // A throwaway root: the binary runs, the configs check, the units verify.
    let fs = dir.path().join("root");
    run(Command::new("dpkg-deb").args(["-x", &deb]).arg(&fs));
    let banmesh = fs.join("usr/bin/banmesh");
    let version = run(Command::new(&banmesh).arg("--version"));
    assert_eq!(
        version.trim(),
        format!("banmesh {}", env!("CARGO_PKG_VERSION"))
    );
    for name in ["hub.toml", "node.toml"] {
        let path = fs.join("etc/banmesh").join(name);
        let said = run(Command::new(&banmesh)
            .args(["config", "check", "--config"])
            .arg(&path));
        assert!(said.contains(": ok ("), "{said}");
    }
    // The README's first command, from the unpacked binary.
    let demo = run(Command::new(&banmesh).args(["demo", "--bans", "2", "--gap", "50ms"]));
    assert!(
        demo.contains("banmesh demo: a throwaway fleet in "),
        "{demo}"
    );
    let mut units = Vec::new();
    for name in ["banmesh-hub.service", "banmesh-node.service"] {
        let text = std::fs::read_to_string(fs.join("usr/lib/systemd/system").join(name)).unwrap();
        let unit = dir.path().join(name);
        std::fs::write(
            &unit,
            text.replace("/usr/bin/banmesh", &banmesh.display().to_string()),
        )
        .unwrap();
        units.push(unit);
    }
    let said = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&units));
    assert!(said.trim().is_empty(), "{said}");
}
