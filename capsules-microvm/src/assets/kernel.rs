//! Kernel files: the ELF `vmlinux` inside a bzImage, and kernel-module dependencies.

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::error::{AssetError, IoContext, Result, find_tool, tail};

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];

/// The zstd-compressed payload of a bzImage (without the 4-byte size trailer the kernel build
/// appends) and the uncompressed size that trailer records.
pub(crate) fn bzimage_payload(img: &[u8]) -> Result<(&[u8], Option<u64>)> {
    let bad = |m: &str| AssetError::Invalid(format!("vmlinuz is not a bzImage with a zstd payload: {m}"));
    // Boot protocol >= 2.08 records where the compressed payload is: use it when present.
    if img.len() > 0x250 && &img[0x202..0x206] == b"HdrS" {
        let setup_sects = match img[0x1f1] {
            0 => 4,
            n => n as usize,
        };
        let le32 = |o: usize| u32::from_le_bytes(img[o..o + 4].try_into().expect("4 bytes")) as usize;
        let start = (setup_sects + 1) * 512 + le32(0x248);
        let len = le32(0x24c);
        if len > 4 && start + len <= img.len() && img[start..start + 4] == ZSTD_MAGIC {
            let payload = &img[start..start + len];
            let size = u32::from_le_bytes(payload[len - 4..].try_into().expect("4 bytes"));
            return Ok((&payload[..len - 4], Some(size.into())));
        }
    }
    // Fall back to the first zstd frame magic, like the kernel's `extract-vmlinux`.
    let pos = img
        .windows(4)
        .position(|w| w == ZSTD_MAGIC)
        .ok_or_else(|| bad("no zstd magic (28 b5 2f fd) found"))?;
    Ok((&img[pos..], None))
}

/// Decompresses the bzImage's payload with the `zstd` tool and checks the result is the ELF
/// `vmlinux` with a PVH entry note.
pub(crate) fn extract_vmlinux(vmlinuz: &[u8]) -> Result<Vec<u8>> {
    let (payload, size) = bzimage_payload(vmlinuz)?;
    let zstd = find_tool("zstd", "zstd")?;
    let mut child = Command::new(zstd)
        .args(["-d", "-c", "-q"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ctx(|| "start zstd to decompress vmlinuz".into())?;
    let mut stdin = child.stdin.take().expect("piped");
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let mut out = Vec::new();
    let mut err = Vec::new();
    std::thread::scope(|s| {
        s.spawn(move || {
            // With the fallback (no exact length) zstd stops at the frame end and may close stdin
            // early: a broken pipe here is expected then.
            let _ = stdin.write_all(payload);
        });
        s.spawn(|| stderr.read_to_end(&mut err));
        stdout.read_to_end(&mut out)
    })
    .ctx(|| "read the decompressed kernel from zstd".into())?;
    let status = child.wait().ctx(|| "wait for zstd".into())?;
    // Without the exact length, trailing bytes after the frame make zstd complain; the output
    // is still complete, and the ELF checks below decide.
    if !status.success() && (size.is_some() || out.is_empty()) {
        return Err(AssetError::Command {
            what: "decompressing the kernel's zstd payload".into(),
            status: status.to_string(),
            output: tail(&err, &[]),
        });
    }
    if let Some(size) = size
        && out.len() as u64 != size
    {
        return Err(AssetError::Invalid(format!(
            "decompressed vmlinux is {} bytes, the bzImage says {size}",
            out.len()
        )));
    }
    check_pvh_elf(&out)?;
    Ok(out)
}

/// Checks `elf` is a 64-bit ELF with a `Xen` note of type 18 (`XEN_ELFNOTE_PHYS32_ENTRY`), the PVH
/// entry point Cloud Hypervisor boots.
pub(crate) fn check_pvh_elf(elf: &[u8]) -> Result<()> {
    let bad = |m: &str| AssetError::Invalid(format!("extracted vmlinux: {m}"));
    if elf.len() < 64 || elf[..4] != ELF_MAGIC {
        return Err(bad("no ELF magic"));
    }
    if elf[4] != 2 {
        return Err(bad("not a 64-bit ELF"));
    }
    let phoff = u64le(elf, 0x20).ok_or_else(|| bad("truncated header"))? as usize;
    let phentsize = u16le(elf, 0x36).ok_or_else(|| bad("truncated header"))? as usize;
    let phnum = u16le(elf, 0x38).ok_or_else(|| bad("truncated header"))? as usize;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        const PT_NOTE: u32 = 4;
        if u32le(elf, ph) != Some(PT_NOTE) {
            continue;
        }
        let (Some(off), Some(size)) = (u64le(elf, ph + 8), u64le(elf, ph + 0x20)) else {
            return Err(bad("truncated program header"));
        };
        let notes = elf
            .get(off as usize..(off + size) as usize)
            .ok_or_else(|| bad("note segment out of bounds"))?;
        let mut p = 0usize;
        while p + 12 <= notes.len() {
            let namesz = u32le(notes, p).unwrap_or(0) as usize;
            let descsz = u32le(notes, p + 4).unwrap_or(0) as usize;
            let ntype = u32le(notes, p + 8).unwrap_or(0);
            let name = notes.get(p + 12..p + 12 + namesz).unwrap_or(&[]);
            if name == b"Xen\0" && ntype == 18 {
                return Ok(());
            }
            p += 12 + namesz.div_ceil(4) * 4 + descsz.div_ceil(4) * 4;
        }
    }
    Err(bad(
        "no PVH entry note (Xen note type 18); this kernel cannot boot under Cloud Hypervisor",
    ))
}

/// True if `elf` has no program interpreter (a statically linked executable).
pub(crate) fn is_static_elf(elf: &[u8]) -> bool {
    if elf.len() < 64 || elf[..4] != ELF_MAGIC || elf[4] != 2 {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64le(elf, 0x20), u16le(elf, 0x36), u16le(elf, 0x38)) else {
        return false;
    };
    const PT_INTERP: u32 = 3;
    (0..phnum as usize).all(|i| u32le(elf, phoff as usize + i * phentsize as usize) != Some(PT_INTERP))
}

/// The `depends=` list from the `.modinfo` section of an (uncompressed) kernel module.
pub(crate) fn module_depends(ko: &[u8]) -> Result<Vec<String>> {
    let bad = |m: &str| AssetError::Invalid(format!("kernel module: {m}"));
    if ko.len() < 64 || ko[..4] != ELF_MAGIC || ko[4] != 2 {
        return Err(bad("not a 64-bit ELF"));
    }
    let shoff = u64le(ko, 0x28).ok_or_else(|| bad("truncated header"))? as usize;
    let shentsize = u16le(ko, 0x3a).ok_or_else(|| bad("truncated header"))? as usize;
    let shnum = u16le(ko, 0x3c).ok_or_else(|| bad("truncated header"))? as usize;
    let shstrndx = u16le(ko, 0x3e).ok_or_else(|| bad("truncated header"))? as usize;
    let section = |i: usize| -> Option<(u32, &[u8])> {
        let sh = shoff + i * shentsize;
        let name = u32le(ko, sh)?;
        let off = u64le(ko, sh + 0x18)? as usize;
        let size = u64le(ko, sh + 0x20)? as usize;
        Some((name, ko.get(off..off.checked_add(size)?)?))
    };
    let (_, strtab) = section(shstrndx).ok_or_else(|| bad("bad section string table"))?;
    for i in 0..shnum {
        let (name, data) = section(i).ok_or_else(|| bad("bad section header"))?;
        let name = strtab.get(name as usize..).unwrap_or(&[]);
        let name = &name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())];
        if name != b".modinfo" {
            continue;
        }
        for entry in data.split(|&c| c == 0) {
            if let Some(deps) = entry.strip_prefix(b"depends=") {
                let deps = String::from_utf8_lossy(deps);
                return Ok(deps
                    .split(',')
                    .filter(|d| !d.is_empty())
                    .map(|d| d.replace('-', "_"))
                    .collect());
            }
        }
        return Ok(Vec::new());
    }
    Err(bad("no .modinfo section"))
}

/// Indexes `*.ko`, `*.ko.xz`, `*.ko.zst` under `dir` by module name (with `-` as `_`).
pub(crate) fn index_modules(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let mut map = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).ctx(|| format!("list {}", d.display()))? {
            let entry = entry.ctx(|| format!("list {}", d.display()))?;
            let path = entry.path();
            let ft = entry.file_type().ctx(|| format!("stat {}", path.display()))?;
            if ft.is_dir() {
                stack.push(path);
            } else if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
                for ext in [".ko", ".ko.xz", ".ko.zst"] {
                    if let Some(stem) = name.strip_suffix(ext) {
                        map.insert(stem.replace('-', "_"), path.clone());
                    }
                }
            }
        }
    }
    Ok(map)
}

/// `wanted` plus everything they depend on, dependencies first (a stable DFS post-order).
pub(crate) fn load_order(wanted: &[&str], mut depends: impl FnMut(&str) -> Result<Vec<String>>) -> Result<Vec<String>> {
    fn visit(
        m: &str,
        depends: &mut dyn FnMut(&str) -> Result<Vec<String>>,
        done: &mut HashSet<String>,
        active: &mut Vec<String>,
        out: &mut Vec<String>,
    ) -> Result<()> {
        if done.contains(m) {
            return Ok(());
        }
        if active.iter().any(|a| a == m) {
            return Err(AssetError::Invalid(format!(
                "kernel module dependency cycle: {} -> {m}",
                active.join(" -> ")
            )));
        }
        active.push(m.to_owned());
        for d in depends(m)? {
            visit(&d, depends, done, active, out)?;
        }
        active.pop();
        done.insert(m.to_owned());
        out.push(m.to_owned());
        Ok(())
    }
    let (mut done, mut active, mut out) = (HashSet::new(), Vec::new(), Vec::new());
    for m in wanted {
        visit(&m.replace('-', "_"), &mut depends, &mut done, &mut active, &mut out)?;
    }
    Ok(out)
}

fn u16le(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn u32le(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}
fn u64le(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_puts_dependencies_first() {
        let deps = |m: &str| -> Result<Vec<String>> {
            Ok(match m {
                "virtio_net" => vec!["net_failover".into()],
                "net_failover" => vec!["failover".into()],
                "vmw_vsock_virtio_transport" => {
                    vec!["vmw_vsock_virtio_transport_common".into(), "vsock".into()]
                }
                "vmw_vsock_virtio_transport_common" => vec!["vsock".into()],
                _ => vec![],
            })
        };
        let order = load_order(
            &["virtio_blk", "virtio_net", "vmw_vsock_virtio_transport", "failover"],
            deps,
        )
        .unwrap();
        assert_eq!(
            order,
            [
                "virtio_blk",
                "failover",
                "net_failover",
                "virtio_net",
                "vsock",
                "vmw_vsock_virtio_transport_common",
                "vmw_vsock_virtio_transport"
            ]
        );
    }

    #[test]
    fn order_detects_cycles() {
        let deps = |m: &str| -> Result<Vec<String>> { Ok(vec![if m == "a" { "b" } else { "a" }.into()]) };
        assert!(load_order(&["a"], deps).is_err());
    }

    #[test]
    fn payload_found_by_magic_without_header() {
        let mut img = vec![0u8; 100];
        img.extend_from_slice(&ZSTD_MAGIC);
        img.extend_from_slice(b"rest");
        let (p, size) = bzimage_payload(&img).unwrap();
        assert_eq!(&p[..4], &ZSTD_MAGIC);
        assert_eq!(size, None);
        assert!(bzimage_payload(&[0u8; 600]).is_err());
    }

    #[test]
    fn non_elf_is_rejected() {
        assert!(check_pvh_elf(b"not an elf at all, but long enough to have a header of 64 bytes....").is_err());
        assert!(!is_static_elf(b"nope"));
        assert!(module_depends(&[0u8; 80]).is_err());
    }

    #[test]
    fn host_binaries_are_dynamic() {
        // /bin/sh on a Debian host is dynamically linked: the static check must say so.
        if let Ok(sh) = std::fs::read("/bin/sh") {
            assert!(!is_static_elf(&sh));
        }
    }
}
