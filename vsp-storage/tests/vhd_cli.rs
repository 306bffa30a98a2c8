//! The `vhd` command end to end: help, every subcommand, JSON output, exit codes and errors.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};

fn vhd(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_vhd"))
        .args(args)
        .output()
        .unwrap();
    eprintln!(
        "$ vhd {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ok(args: &[&str]) -> String {
    let out = vhd(args);
    assert!(out.status.success(), "vhd {args:?} failed");
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str], code: i32, message: &str) {
    let out = vhd(args);
    assert_eq!(out.status.code(), Some(code), "vhd {args:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(message),
        "vhd {args:?}: {err:?} lacks {message:?}"
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(args)).unwrap()
}

#[test]
fn help_for_every_subcommand() {
    let top = ok(&["--help"]);
    for sub in ["inspect", "create", "expand", "compact", "convert", "merge"] {
        assert!(top.contains(sub));
        let h = ok(&[sub, "--help"]);
        assert!(h.contains("Usage: vhd"), "{sub}");
    }
}

#[test]
fn lifecycle() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.vhd");
    let child = d.path().join("child.vhd");
    let raw = d.path().join("data.raw");
    let out = ok(&["create", s(&base), "--size", "10M"]);
    assert!(out.contains("10514432"), "{out}");
    let i = json(&["inspect", "--json", s(&base)]);
    assert_eq!(i["ok"], true);
    assert_eq!(i["footer"]["disk_type"], "dynamic");
    assert_eq!(i["virtual_size"], 10_514_432);
    assert_eq!(i["footer"]["geometry"]["cylinders"], 302);

    // Raw data in, through a dynamic image, into the base via a differencing image + merge.
    let mut data = vec![0u8; 10_514_432];
    for (i, b) in data.iter_mut().enumerate().skip(3 << 20).take(1 << 20) {
        *b = (i % 251) as u8 + 1;
    }
    std::fs::write(&raw, &data).unwrap();
    ok(&["create", s(&child), "--parent", s(&base)]);
    let i = json(&["inspect", "--json", s(&child)]);
    assert_eq!(i["footer"]["disk_type"], "differencing");
    assert_eq!(i["parents"][0].as_str().unwrap(), s(&base));
    let conv = d.path().join("conv.vhd");
    ok(&[
        "convert",
        s(&raw),
        s(&conv),
        "--to",
        "dynamic",
        "--block-size",
        "1M",
    ]);
    let i = json(&["inspect", "--json", s(&conv)]);
    assert_eq!(i["bat"]["allocated_blocks"], 1);
    assert_eq!(i["header"]["block_size"], 1 << 20);
    let back = d.path().join("back.raw");
    ok(&["convert", s(&conv), s(&back), "--to", "raw"]);
    assert_eq!(std::fs::read(&back).unwrap(), data);

    let m = json(&["merge", "--json", s(&child)]);
    assert_eq!(m["sectors_merged"], 0);
    ok(&["merge", s(&child), "--remove-child"]);
    assert!(!child.exists());

    ok(&["expand", s(&conv), "--size", "20M"]);
    let i = json(&["inspect", "--json", s(&conv)]);
    assert!(i["virtual_size"].as_u64().unwrap() >= 20 << 20);
    let c = json(&["compact", "--json", s(&conv)]);
    assert_eq!(c["blocks_dropped"], 0);

    let fixed = d.path().join("fixed.vhd");
    ok(&[
        "create",
        s(&fixed),
        "--size",
        "1M",
        "--type",
        "fixed",
        "--exact-size",
    ]);
    assert_eq!(std::fs::metadata(&fixed).unwrap().len(), (1 << 20) + 512);
}

#[test]
fn errors_are_clear_and_nonzero() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("x.vhd");
    fails(&["inspect", "/nonexistent/x.vhd"], 1, "No such file");
    let junk = d.path().join("junk");
    std::fs::write(&junk, vec![7u8; 4096]).unwrap();
    fails(&["inspect", s(&junk)], 1, "not a VHD image");
    fails(&["create", s(&img)], 1, "--size is required");
    fails(
        &["create", s(&img), "--size", "12Q"],
        2,
        "unknown size suffix",
    );
    fails(
        &["create", s(&img), "--size", "3T"],
        1,
        "larger than the VHD maximum",
    );
    fails(
        &["create", s(&img), "--size", "1M", "--block-size", "3000"],
        1,
        "not a power of two",
    );
    ok(&["create", s(&img), "--size", "1M"]);
    fails(&["create", s(&img), "--size", "1M"], 1, "already exists");
    fails(
        &["expand", s(&img), "--size", "512K"],
        1,
        "shrinking is not supported",
    );
    fails(&["merge", s(&img)], 1, "not a differencing one");
    let fixed = d.path().join("f.vhd");
    ok(&["create", s(&fixed), "--size", "1M", "--type", "fixed"]);
    fails(&["compact", s(&fixed)], 1, "fixed image");

    // A damaged header: inspect reports failed checks with exit status 2, open fails.
    let mut b = std::fs::read(&img).unwrap();
    b[600] ^= 0xff;
    std::fs::write(&img, &b).unwrap();
    let out = vhd(&["inspect", s(&img)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAIL"));
    fails(&["compact", s(&img)], 1, "bad dynamic header checksum");

    // A differencing image whose parent is gone.
    let base = d.path().join("base.vhd");
    let child = d.path().join("child.vhd");
    ok(&["create", s(&base), "--size", "1M"]);
    ok(&["create", s(&child), "--parent", s(&base)]);
    std::fs::remove_file(&base).unwrap();
    fails(&["merge", s(&child)], 1, "not found");
    let out = vhd(&["inspect", "--no-parent", s(&child)]);
    assert_eq!(out.status.code(), Some(0));
}
