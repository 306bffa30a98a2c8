//! Interoperability of our VHD images with qemu's "vpc" driver (`qemu-img`, `qemu-io` from
//! Debian's qemu-utils). Every test prints why it skips when the tools are missing.
//!
//! qemu sizes a VHD by its CHS geometry unless the creator is one it knows to use the current
//! size, or the geometry is the maximum 65535/16/255 (what `force_size` writes). Our images are
//! either rounded up to a CHS geometry (the default, like `qemu-img create`) or use the maximum
//! geometry (`exact_size`), so qemu and we agree on the size either way; the tests check that.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use vsp_storage::block::BlockDevice;
use vsp_storage::vhd::{
    self, ConvertOptions, CreateOptions, DiskKind, Footer, Format, OpenOptions, Vhd,
};

fn tool(name: &str) -> Option<PathBuf> {
    let ok = Command::new(name)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    ok.then(|| PathBuf::from(name))
}

macro_rules! require {
    ($name:expr) => {
        match tool($name) {
            Some(t) => t,
            None => {
                eprintln!(
                    "skipping: {} not found (install the qemu-utils package)",
                    $name
                );
                return;
            }
        }
    };
}

fn run(cmd: &Path, args: &[&str]) -> Output {
    let out = Command::new(cmd).args(args).output().unwrap();
    eprintln!(
        "$ {} {}\n{}{}",
        cmd.display(),
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn run_ok(cmd: &Path, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(out.status.success(), "{} {:?} failed", cmd.display(), args);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Deterministic pseudo-random bytes (xorshift).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// `qemu-img info` virtual size.
fn qemu_virtual_size(qemu_img: &Path, img: &Path, fmt: &str) -> u64 {
    let json = run_ok(qemu_img, &["info", "--output=json", "-f", fmt, s(img)]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["format"], fmt);
    v["virtual-size"].as_u64().unwrap()
}

/// `qemu-img check`: qemu's vpc driver has no check; then `qemu-img info` must succeed.
fn qemu_check(qemu_img: &Path, img: &Path) {
    let out = run(qemu_img, &["check", "-f", "vpc", s(img)]);
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        return;
    }
    assert!(
        err.contains("does not support checks"),
        "qemu-img check failed: {err}"
    );
    run_ok(qemu_img, &["info", "-f", "vpc", s(img)]);
}

/// Writes `data` at some offsets of a new image and the same into a raw file.
fn fill(v: &Vhd, raw: &Path) -> Vec<u8> {
    let size = v.size() as usize;
    let mut model = vec![0u8; size];
    let writes = [
        (0usize, 4096usize),
        (512 * 1001, 512 * 3),
        (2 << 20, 3 << 20),
        (size / 1024 * 512 + 512 * 7, 70_000 / 512 * 512),
        (size - 512 * 9, 512 * 9),
    ];
    for (i, &(off, len)) in writes.iter().enumerate() {
        let d = noise(len, i as u64 + 11);
        v.write_at(off as u64, &d, false).unwrap();
        model[off..off + len].copy_from_slice(&d);
    }
    v.flush().unwrap();
    std::fs::write(raw, &model).unwrap();
    model
}

#[test]
fn qemu_reads_our_fixed_and_dynamic_images() {
    let qemu_img = require!("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    // (requested size, exact): 10 MiB rounds up to CHS 302/4/17 = 10514432; 24 MiB exact uses
    // the maximum geometry; 11 MiB + 512 is kept exactly too.
    for (size, exact) in [
        (10u64 << 20, false),
        (24 << 20, true),
        ((11 << 20) + 512, true),
    ] {
        for kind in [DiskKind::Fixed, DiskKind::Dynamic] {
            let img = dir.path().join(format!("{kind:?}-{size}.vhd"));
            let raw = dir.path().join(format!("{kind:?}-{size}.raw"));
            let mut o = CreateOptions::new(size, kind.clone());
            o.exact_size = exact;
            o.block_size = 1 << 20;
            let v = vhd::create(&img, &o).unwrap();
            fill(&v, &raw);
            let our_size = v.size();
            drop(v);
            qemu_check(&qemu_img, &img);
            assert_eq!(qemu_virtual_size(&qemu_img, &img, "vpc"), our_size);
            run_ok(
                &qemu_img,
                &["compare", "-f", "vpc", "-F", "raw", s(&img), s(&raw)],
            );
        }
    }
}

#[test]
fn qemu_reads_our_compacted_expanded_and_converted_images() {
    let qemu_img = require!("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.vhd");
    let raw = dir.path().join("d.raw");
    let mut o = CreateOptions::new(16 << 20, DiskKind::Dynamic);
    o.block_size = 512 * 1024;
    let v = vhd::create(&img, &o).unwrap();
    let mut model = fill(&v, &raw);
    // Zero a whole block and unmap another, then compact.
    v.write_at(2 << 20, &vec![0u8; 512 * 1024], false).unwrap();
    v.unmap((2 << 20) + 512 * 1024, 512 * 1024).unwrap();
    model[2 << 20..(3 << 20)].fill(0);
    drop(v);
    std::fs::write(&raw, &model).unwrap();
    let r = vhd::compact(&img, &mut |_, _| {}).unwrap();
    assert!(r.blocks_dropped >= 1 && r.file_size_after < r.file_size_before);
    qemu_check(&qemu_img, &img);
    run_ok(
        &qemu_img,
        &["compare", "-f", "vpc", "-F", "raw", s(&img), s(&raw)],
    );

    // Expand (rounded to CHS again) and compare against the raw file grown with zeros.
    let new = vhd::expand(&img, 40 << 20, false).unwrap();
    model.resize(new as usize, 0);
    std::fs::write(&raw, &model).unwrap();
    assert_eq!(qemu_virtual_size(&qemu_img, &img, "vpc"), new);
    run_ok(
        &qemu_img,
        &["compare", "-f", "vpc", "-F", "raw", s(&img), s(&raw)],
    );

    // A differencing image over it, flattened by convert into a fixed image.
    let child = dir.path().join("c.vhd");
    let c = vhd::create(
        &child,
        &CreateOptions::new(
            0,
            DiskKind::Differencing {
                parent: img.clone(),
            },
        ),
    )
    .unwrap();
    let d = noise(3 << 20, 99);
    c.write_at(5 << 20, &d, false).unwrap();
    model[5 << 20..8 << 20].copy_from_slice(&d);
    drop(c);
    std::fs::write(&raw, &model).unwrap();
    let flat = dir.path().join("flat.vhd");
    vhd::convert(
        &child,
        &flat,
        &ConvertOptions::new(Format::Fixed),
        &mut |_, _| {},
    )
    .unwrap();
    qemu_check(&qemu_img, &flat);
    run_ok(
        &qemu_img,
        &["compare", "-f", "vpc", "-F", "raw", s(&flat), s(&raw)],
    );
}

/// Reads a whole image with our code.
fn read_ours(img: &Path) -> Vec<u8> {
    let v = Vhd::open(img, &OpenOptions::read_only()).unwrap();
    let mut all = vec![0u8; v.size() as usize];
    v.read_at(0, &mut all).unwrap();
    all
}

#[test]
fn we_read_what_qemu_img_convert_writes() {
    let qemu_img = require!("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("src.raw");
    // Not a CHS size, with a zero hole (left unallocated by qemu's dynamic images).
    let len = (7 << 20) + 4096 * 3;
    let mut data = noise(len, 5);
    data[(1 << 20)..(4 << 20)].fill(0);
    std::fs::write(&raw, &data).unwrap();
    let variants: [&[&str]; 4] = [
        &[],
        &["-o", "subformat=fixed"],
        &["-o", "force_size=on"],
        &["-o", "subformat=fixed,force_size=on"],
    ];
    for (i, extra) in variants.iter().enumerate() {
        let out = dir.path().join(format!("q{i}.vhd"));
        let mut args = vec!["convert", "-f", "raw", "-O", "vpc"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[s(&raw), s(&out)]);
        run_ok(&qemu_img, &args);
        let qsize = qemu_virtual_size(&qemu_img, &out, "vpc");
        let insp = vhd::inspect(&out, true).unwrap();
        assert!(insp.ok, "{extra:?}: {:?}", insp.checks);
        let ours = read_ours(&out);
        assert_eq!(ours.len() as u64, qsize, "{extra:?}: size");
        assert!(ours.len() >= len);
        assert!(ours[..len] == data[..], "{extra:?}: data differs");
        assert!(ours[len..].iter().all(|&b| b == 0), "{extra:?}: tail");
        if extra.iter().any(|a| a.contains("force_size")) {
            assert_eq!(ours.len(), len, "force_size keeps the exact size");
        }
    }
}

#[test]
fn geometry_matches_qemu_img_create() {
    let qemu_img = require!("qemu-img");
    let dir = tempfile::tempdir().unwrap();
    for req in [
        "1M",
        "10M",
        "100M",
        "1G",
        "2G",
        "3000000000",
        "127G",
        "200G",
    ] {
        let q = dir.path().join(format!("q{req}.vhd"));
        run_ok(&qemu_img, &["create", "-q", "-f", "vpc", s(&q), req]);
        let bytes = std::fs::read(&q).unwrap();
        let mut f = [0u8; 512];
        f.copy_from_slice(&bytes[bytes.len() - 512..]);
        let qf = Footer::parse(&f).unwrap();
        let req_bytes = parse(req);
        let (size, geometry) = vhd::rounded_size(req_bytes, false).unwrap();
        assert_eq!(geometry, qf.geometry, "{req}");
        assert_eq!(size, qf.current_size, "{req}");
        assert_eq!(size, qemu_virtual_size(&qemu_img, &q, "vpc"), "{req}");
        // And our own image of that size reads back the same through qemu.
        let ours = dir.path().join(format!("o{req}.vhd"));
        let v = vhd::create(&ours, &CreateOptions::new(req_bytes, DiskKind::Dynamic)).unwrap();
        assert_eq!(v.size(), size);
        assert_eq!(v.footer().geometry, qf.geometry);
        drop(v);
        assert_eq!(qemu_virtual_size(&qemu_img, &ours, "vpc"), size, "{req}");
    }
}

fn parse(s: &str) -> u64 {
    match s.as_bytes().last() {
        Some(b'M') => s[..s.len() - 1].parse::<u64>().unwrap() << 20,
        Some(b'G') => s[..s.len() - 1].parse::<u64>().unwrap() << 30,
        _ => s.parse().unwrap(),
    }
}

#[test]
fn qemu_io_writes_into_our_dynamic_image() {
    let qemu_img = require!("qemu-img");
    let qemu_io = require!("qemu-io");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.vhd");
    let v = vhd::create(&img, &CreateOptions::new(8 << 20, DiskKind::Dynamic)).unwrap();
    let size = v.size();
    let first = noise(4096, 1);
    v.write_at(0, &first, false).unwrap();
    drop(v);
    // qemu allocates two more blocks behind ours and moves the footer.
    run_ok(
        &qemu_io,
        &[
            "-f",
            "vpc",
            "-c",
            "write -P 0xab 2M 64k",
            "-c",
            "write -P 0xcd 6M 4k",
            s(&img),
        ],
    );
    let insp = vhd::inspect(&img, true).unwrap();
    assert!(insp.ok, "{:?}", insp.checks);
    assert_eq!(insp.bat.as_ref().unwrap().allocated_blocks, 3);
    let all = read_ours(&img);
    assert_eq!(all.len() as u64, size);
    assert_eq!(all[..4096], first[..]);
    assert!(all[2 << 20..(2 << 20) + 65536].iter().all(|&b| b == 0xab));
    assert!(all[6 << 20..(6 << 20) + 4096].iter().all(|&b| b == 0xcd));
    // And we keep writing after qemu, then qemu reads it all back.
    let v = Vhd::open(&img, &OpenOptions::default()).unwrap();
    v.write_at(4 << 20, &noise(8192, 3), true).unwrap();
    drop(v);
    let mut model = all;
    model[4 << 20..(4 << 20) + 8192].copy_from_slice(&noise(8192, 3));
    let raw = dir.path().join("m.raw");
    std::fs::write(&raw, &model).unwrap();
    run_ok(
        &qemu_img,
        &["compare", "-f", "vpc", "-F", "raw", s(&img), s(&raw)],
    );
}
