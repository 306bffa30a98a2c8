//! Parent locators: writing them for a new differencing image, and finding the parent of an
//! existing one.
//!
//! We write three locators, like Hyper-V plus the Mac OS X one: `W2ru` (relative path,
//! UTF-16LE, `.\parent.vhd`), `W2ku` (absolute path, UTF-16LE, with `\` separators) and `MacX`
//! (a `file://` URL, UTF-8), and the parent's absolute path (or, if longer than 255 UTF-16 units,
//! its file name) as the parent unicode name. To open, candidates are tried in this order:
//! `W2ru`, `MacX`, `W2ku`, the deprecated ANSI `Wi2r`/`Wi2k`, the parent unicode name, and then the
//! file name of each of these in the child's directory (Windows drive-letter paths only get that
//! last treatment). The first existing candidate whose UUID matches the child's parent UUID wins.

use std::fs::File;
use std::path::{Component, Path, PathBuf};

use super::header::{DynamicHeader, ParentLocator, PlatformCode};
use super::image::{OpenOptions, Vhd};
use super::util::read_exact_at;
use super::{VhdError, format_uuid};

/// Locator data of a new differencing image: (platform, bytes).
pub(crate) struct NewLocators {
    pub(crate) parent_name: Vec<u16>,
    pub(crate) entries: Vec<(PlatformCode, Vec<u8>)>,
}

fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

fn path_str(p: &Path) -> Result<&str, VhdError> {
    p.to_str().ok_or_else(|| {
        VhdError::InvalidArgument(format!("path {} is not valid UTF-8", p.display()))
    })
}

/// The path of `target` relative to the directory `base` (both absolute).
fn relative_path(base: &Path, target: &Path) -> PathBuf {
    let b: Vec<Component<'_>> = base.components().collect();
    let t: Vec<Component<'_>> = target.components().collect();
    let common = b.iter().zip(&t).take_while(|(x, y)| x == y).count();
    let mut rel = PathBuf::new();
    for _ in common..b.len() {
        rel.push("..");
    }
    for c in t.iter().skip(common) {
        rel.push(c.as_os_str());
    }
    rel
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(v) = u8::from_str_radix(hex, 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The directory a child's relative locators are relative to.
fn child_dir(child: &Path) -> Result<PathBuf, VhdError> {
    let dir = match child.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    Ok(std::fs::canonicalize(dir)?)
}

/// Locators pointing from `child` (which may not exist yet) to `parent`.
pub(crate) fn new_locators(child: &Path, parent: &Path) -> Result<NewLocators, VhdError> {
    let parent_abs = std::fs::canonicalize(parent)?;
    let dir = child_dir(child)?;
    let rel = relative_path(&dir, &parent_abs);
    let abs = path_str(&parent_abs)?;
    let rel = path_str(&rel)?.replace('/', "\\");
    let rel = if rel.starts_with("..") {
        rel
    } else {
        format!(".\\{rel}")
    };
    let mut parent_name: Vec<u16> = abs.encode_utf16().collect();
    if parent_name.len() > 255 {
        let name = parent_abs
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        parent_name = name.encode_utf16().take(255).collect();
    }
    Ok(NewLocators {
        parent_name,
        entries: vec![
            (PlatformCode::W2ru, utf16le(&rel)),
            (PlatformCode::W2ku, utf16le(&abs.replace('/', "\\"))),
            (
                PlatformCode::MacX,
                format!("file://{}", percent_encode(abs)).into_bytes(),
            ),
        ],
    })
}

/// The text of a locator, decoded by platform (None for Mac aliases and unknown codes).
pub fn decode_locator(platform: PlatformCode, data: &[u8]) -> Option<String> {
    let s = match platform {
        PlatformCode::W2ru | PlatformCode::W2ku => {
            let units: Vec<u16> = data
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16_lossy(&units)
        }
        PlatformCode::Wi2r | PlatformCode::Wi2k | PlatformCode::MacX => {
            String::from_utf8_lossy(data).into_owned()
        }
        PlatformCode::Mac | PlatformCode::None | PlatformCode::Unknown(_) => return None,
    };
    let s = s.trim_end_matches('\0').to_string();
    (!s.is_empty()).then_some(s)
}

/// Reads a locator's data from the image (bounded by its declared length).
pub(crate) fn read_locator(file: &File, loc: &ParentLocator) -> Result<Vec<u8>, VhdError> {
    const MAX_LOCATOR: u32 = 64 * 1024;
    let len = loc.data_length.min(MAX_LOCATOR);
    let mut data = vec![0u8; usize::try_from(len).unwrap_or(0)];
    read_exact_at(file, &mut data, loc.data_offset)?;
    Ok(data)
}

fn is_windows_absolute(s: &str) -> bool {
    let b = s.as_bytes();
    (b.len() >= 2 && b[0].is_ascii_alphabetic() && b[1] == b':') || s.starts_with("\\\\")
}

/// Candidate parent paths for a differencing image at `child`, in order, with what each came from.
pub fn parent_candidates(
    child: &Path,
    header: &DynamicHeader,
    file: &File,
) -> Result<Vec<(String, PathBuf)>, VhdError> {
    let dir = child_dir(child)?;
    let mut texts: Vec<(String, String, bool)> = Vec::new(); // (source, text, relative)
    let order = [
        PlatformCode::W2ru,
        PlatformCode::MacX,
        PlatformCode::W2ku,
        PlatformCode::Wi2r,
        PlatformCode::Wi2k,
    ];
    for platform in order {
        for loc in header.locators.iter().filter(|l| l.platform == platform) {
            let Ok(data) = read_locator(file, loc) else {
                continue;
            };
            if let Some(text) = decode_locator(platform, &data) {
                let relative = matches!(platform, PlatformCode::W2ru | PlatformCode::Wi2r);
                texts.push((platform.name(), text, relative));
            }
        }
    }
    let name = header.parent_name_string();
    if !name.is_empty() {
        texts.push(("parent name".into(), name, false));
    }
    let mut out: Vec<(String, PathBuf)> = Vec::new();
    let mut basenames: Vec<(String, PathBuf)> = Vec::new();
    for (source, text, relative) in texts {
        let text = match text.strip_prefix("file://") {
            Some(url) => percent_decode(url.strip_prefix("localhost").unwrap_or(url)),
            None => text,
        };
        let windows_abs = is_windows_absolute(&text);
        let unix = text.replace('\\', "/");
        if !windows_abs {
            let p: PathBuf = Path::new(&unix)
                .components()
                .filter(|c| *c != Component::CurDir)
                .collect();
            let full = if relative || p.is_relative() {
                dir.join(p)
            } else {
                p
            };
            out.push((source.clone(), full));
        }
        if let Some(base) = unix.rsplit('/').next().filter(|b| !b.is_empty()) {
            basenames.push((format!("{source} (file name)"), dir.join(base)));
        }
    }
    out.extend(basenames);
    let mut seen: Vec<PathBuf> = Vec::new();
    out.retain(|(_, p)| {
        if seen.contains(p) {
            false
        } else {
            seen.push(p.clone());
            true
        }
    });
    Ok(out)
}

/// Finds and opens the parent of the differencing image at `child`.
pub(crate) fn open_parent(
    child: &Path,
    header: &DynamicHeader,
    file: &File,
    opts: &OpenOptions,
    visited: &mut Vec<PathBuf>,
) -> Result<Vhd, VhdError> {
    let candidates = parent_candidates(child, header, file)?;
    let mut mismatch = None;
    for (_, path) in &candidates {
        if !path.is_file() {
            continue;
        }
        let depth = visited.len();
        let parent = match Vhd::open_chain(path, opts, visited) {
            Ok(p) => p,
            Err(e @ (VhdError::ParentCycle(_) | VhdError::ChainTooDeep(_))) => return Err(e),
            Err(e) => {
                return Err(VhdError::Parent {
                    path: path.clone(),
                    source: Box::new(e),
                });
            }
        };
        if parent.footer.unique_id == header.parent_uuid {
            return Ok(parent);
        }
        visited.truncate(depth);
        mismatch.get_or_insert(VhdError::ParentMismatch {
            child: child.to_path_buf(),
            parent: path.clone(),
            expected: format_uuid(&header.parent_uuid),
            found: format_uuid(&parent.footer.unique_id),
        });
    }
    Err(mismatch.unwrap_or_else(|| VhdError::ParentNotFound {
        child: child.to_path_buf(),
        tried: if candidates.is_empty() {
            "no usable parent locator".into()
        } else {
            candidates
                .iter()
                .map(|(s, p)| format!("{} [{s}]", p.display()))
                .collect::<Vec<_>>()
                .join(", ")
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths() {
        let r = relative_path(Path::new("/a/b/c"), Path::new("/a/b/c/p.vhd"));
        assert_eq!(r, PathBuf::from("p.vhd"));
        let r = relative_path(Path::new("/a/b/c"), Path::new("/a/x/p.vhd"));
        assert_eq!(r, PathBuf::from("../../x/p.vhd"));
    }

    #[test]
    fn decoding() {
        let d = utf16le(".\\base.vhd\0\0");
        assert_eq!(
            decode_locator(PlatformCode::W2ru, &d).as_deref(),
            Some(".\\base.vhd")
        );
        assert_eq!(decode_locator(PlatformCode::Mac, b"xx"), None);
        assert_eq!(percent_decode("/a%20b/c"), "/a b/c");
        assert_eq!(percent_encode("/a b/c"), "/a%20b/c");
        assert!(is_windows_absolute("C:\\x\\y.vhd"));
        assert!(!is_windows_absolute("\\x\\y.vhd"));
    }
}
