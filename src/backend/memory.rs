//! How much memory `--variant auto` may plan for on the CPU, and how much a variant needs there.
//!
//! The memory the process may still use is the smallest of: its cgroup's limit (v2 `memory.max`
//! or v1 `memory.limit_in_bytes`, the process's own cgroup and every ancestor) less what that
//! cgroup already holds (page cache that could be dropped, `inactive_file`, not counted); the
//! machine's `MemAvailable`; and `RLIMIT_AS` / `RLIMIT_DATA` less the process's address space /
//! data segment (`VmSize` / `VmData`). A variant's need ([`cpu_need`]) is its weights as ONNX
//! Runtime's CPU kernels hold them plus what the runtime needs around them.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::package::{Architecture, Package, VariantSpec};

/// How much memory `auto` plans for: detected ([`MemoryLimit::Detect`], the default), given by
/// the user (`--memory-limit 24G`), or not checked (`--memory-limit none`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum MemoryLimit {
    #[default]
    Detect,
    Bytes(u64),
    Unchecked,
}

impl MemoryLimit {
    /// The memory this process may still use under this setting, and where that figure comes
    /// from; `None` when unchecked or when no source could be read.
    pub fn available(&self) -> Option<Available> {
        match *self {
            MemoryLimit::Detect => detect(Path::new("/")),
            MemoryLimit::Bytes(bytes) => Some(Available {
                bytes,
                source: "--memory-limit".into(),
            }),
            MemoryLimit::Unchecked => None,
        }
    }
}

impl FromStr for MemoryLimit {
    type Err = Error;

    /// `auto`, `none`, or a size: bytes, or a number with `K`, `M`, `G` or `T` (powers of 1024;
    /// `G`, `GB` and `GiB` are the same), e.g. `24G`, `512M`, `1.5G`.
    fn from_str(s: &str) -> Result<MemoryLimit> {
        let bad = || {
            Error::input(
                "--memory-limit",
                format!("{s:?} is not a size (24G, 512M, a number of bytes), auto or none"),
            )
        };
        let t = s.trim();
        match t.to_ascii_lowercase().as_str() {
            "auto" => return Ok(MemoryLimit::Detect),
            "none" => return Ok(MemoryLimit::Unchecked),
            _ => {}
        }
        let lower = t.to_ascii_lowercase();
        let digits = lower.trim_end_matches("ib").trim_end_matches('b');
        let (number, shift) = match digits.chars().last() {
            Some('k') => (&digits[..digits.len() - 1], 10),
            Some('m') => (&digits[..digits.len() - 1], 20),
            Some('g') => (&digits[..digits.len() - 1], 30),
            Some('t') => (&digits[..digits.len() - 1], 40),
            _ if lower.ends_with("ib") => return Err(bad()),
            _ => (digits, 0),
        };
        let number = number.trim();
        if number.is_empty() || !number.chars().all(|c| c.is_ascii_digit() || c == '.') {
            return Err(bad());
        }
        let value: f64 = number.parse().map_err(|_| bad())?;
        let bytes = value * (1u64 << shift) as f64;
        if !bytes.is_finite() || bytes < 1.0 || bytes >= u64::MAX as f64 {
            return Err(bad());
        }
        Ok(MemoryLimit::Bytes(bytes as u64))
    }
}

impl fmt::Display for MemoryLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryLimit::Detect => f.write_str("auto"),
            MemoryLimit::Bytes(b) => write!(f, "{b}"),
            MemoryLimit::Unchecked => f.write_str("none"),
        }
    }
}

/// Memory the process may still use, and where that figure comes from (in words).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Available {
    pub bytes: u64,
    pub source: String,
}

impl fmt::Display for Available {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", size(self.bytes), self.source)
    }
}

/// A size in words: `6.6 GiB`, `512.0 MiB`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The smallest of every limit readable under `root` (`/` on a real system; a test's directory
/// laid out like one).
pub(crate) fn detect(root: &Path) -> Option<Available> {
    let read = |path: &str| std::fs::read_to_string(root.join(path.trim_start_matches('/'))).ok();
    let mut found = Vec::new();
    if let (Some(cgroups), Some(mounts)) = (read("/proc/self/cgroup"), read("/proc/self/mountinfo"))
    {
        found.extend(cgroup_limit(root, &cgroups, &mounts));
    }
    if let Some(bytes) = read("/proc/meminfo").and_then(|t| meminfo_available(&t)) {
        found.push(Available {
            bytes,
            source: "MemAvailable in /proc/meminfo".into(),
        });
    }
    if let Some(limits) = read("/proc/self/limits") {
        let status = read("/proc/self/status").unwrap_or_default();
        for (name, row, used) in [
            ("RLIMIT_AS", "Max address space", "VmSize"),
            ("RLIMIT_DATA", "Max data size", "VmData"),
        ] {
            if let Some(limit) = rlimit(&limits, row) {
                let used = status_kib(&status, used).unwrap_or(0) * 1024;
                found.push(Available {
                    bytes: limit.saturating_sub(used),
                    source: format!(
                        "{name} {} less the {} already mapped",
                        size(limit),
                        size(used)
                    ),
                });
            }
        }
    }
    found.into_iter().min_by_key(|a| a.bytes)
}

/// The process's cgroup paths in `/proc/self/cgroup`: the v2 one (`0::/path`) and the v1 memory
/// controller's (`N:...,memory,...:/path`).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct CgroupPaths {
    pub v2: Option<String>,
    pub v1_memory: Option<String>,
}

pub(crate) fn parse_proc_cgroup(text: &str) -> CgroupPaths {
    let mut paths = CgroupPaths::default();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            paths.v2 = Some(path.to_string());
        } else if controllers.split(',').any(|c| c == "memory") {
            paths.v1_memory = Some(path.to_string());
        }
    }
    paths
}

/// A cgroup file system mounted in `/proc/self/mountinfo`: the cgroup its root is (`root`, `/`
/// outside a cgroup namespace) and where it is mounted.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct CgroupMount {
    pub v2: bool,
    pub root: String,
    pub point: PathBuf,
}

/// The cgroup2 mounts and the v1 mounts that carry the memory controller.
pub(crate) fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    let mut mounts = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = left.split(' ').collect();
        let rest: Vec<&str> = right.split(' ').collect();
        if fields.len() < 5 || rest.is_empty() {
            continue;
        }
        let v2 = match rest[0] {
            "cgroup2" => true,
            "cgroup"
                if rest
                    .get(2)
                    .is_some_and(|o| o.split(',').any(|o| o == "memory")) =>
            {
                false
            }
            _ => continue,
        };
        mounts.push(CgroupMount {
            v2,
            root: unescape(fields[3]),
            point: PathBuf::from(unescape(fields[4])),
        });
    }
    mounts
}

/// mountinfo writes space, tab, newline and backslash as octal escapes.
fn unescape(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// The directory of cgroup `path` under `mount`, if the mount shows it.
fn cgroup_dir(mount: &CgroupMount, path: &str) -> Option<PathBuf> {
    let rel = if mount.root == "/" {
        path
    } else {
        path.strip_prefix(mount.root.as_str())?
    };
    let rel = rel.trim_start_matches('/');
    Some(if rel.is_empty() {
        mount.point.clone()
    } else {
        mount.point.join(rel)
    })
}

/// The tightest cgroup limit on this process (its own cgroup or an ancestor's) less that
/// cgroup's usage, v2 where the process has a v2 cgroup with a memory limit, else v1.
fn cgroup_limit(root: &Path, cgroups: &str, mountinfo: &str) -> Option<Available> {
    let paths = parse_proc_cgroup(cgroups);
    let mounts = parse_mountinfo(mountinfo);
    let mut found = Vec::new();
    for mount in &mounts {
        let path = if mount.v2 {
            &paths.v2
        } else {
            &paths.v1_memory
        };
        let Some(dir) = path.as_deref().and_then(|p| cgroup_dir(mount, p)) else {
            continue;
        };
        let files = if mount.v2 {
            CgroupFiles::V2
        } else {
            CgroupFiles::V1
        };
        // From the process's cgroup up to the mount point, each level that has a limit.
        let mut level = Some(dir.as_path());
        while let Some(d) = level {
            if let Some(a) = files.available(root, d) {
                found.push(a);
            }
            if d == mount.point {
                break;
            }
            level = d.parent().filter(|p| p.starts_with(&mount.point));
        }
    }
    found.into_iter().min_by_key(|a| a.bytes)
}

#[derive(Clone, Copy)]
enum CgroupFiles {
    V1,
    V2,
}

impl CgroupFiles {
    /// This cgroup's limit less its usage (less its inactive page cache), or `None` without a
    /// limit.
    fn available(self, root: &Path, dir: &Path) -> Option<Available> {
        let (limit_file, usage_file, inactive_key, version) = match self {
            CgroupFiles::V2 => ("memory.max", "memory.current", "inactive_file", "v2"),
            CgroupFiles::V1 => (
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
                "total_inactive_file",
                "v1",
            ),
        };
        let on_disk = root.join(dir.strip_prefix("/").unwrap_or(dir));
        let read = |name: &str| std::fs::read_to_string(on_disk.join(name)).ok();
        let limit = parse_cgroup_limit(&read(limit_file)?)?;
        let usage = read(usage_file)
            .and_then(|t| t.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let inactive = read("memory.stat")
            .and_then(|t| stat_value(&t, inactive_key))
            .unwrap_or(0);
        let used = usage.saturating_sub(inactive);
        Some(Available {
            bytes: limit.saturating_sub(used),
            source: format!(
                "cgroup {version} limit {} in {}, less the {} it holds",
                size(limit),
                dir.join(limit_file).display(),
                size(used)
            ),
        })
    }
}

/// A cgroup memory limit file: v2 `max` and v1's huge "unlimited" value are no limit.
pub(crate) fn parse_cgroup_limit(text: &str) -> Option<u64> {
    let text = text.trim();
    if text == "max" {
        return None;
    }
    let bytes: u64 = text.parse().ok()?;
    // v1 writes "no limit" as the largest page-aligned i64 (9223372036854771712).
    (bytes < 1 << 62).then_some(bytes)
}

/// A `key value` line of `memory.stat`.
fn stat_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// `MemAvailable` of `/proc/meminfo`, in bytes.
pub(crate) fn meminfo_available(text: &str) -> Option<u64> {
    status_kib(text, "MemAvailable").map(|k| k * 1024)
}

/// A `Key:   123 kB` line of `/proc/meminfo` or `/proc/self/status`, in KiB.
fn status_kib(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == key)
            .then(|| v.split_whitespace().next()?.parse().ok())
            .flatten()
    })
}

/// The soft limit of a row of `/proc/self/limits` (`Max data size   1073741824   unlimited   bytes`);
/// `None` when unlimited.
pub(crate) fn rlimit(text: &str, row: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with(row))?;
    line[row.len()..].split_whitespace().next()?.parse().ok()
}

/// Bytes ONNX Runtime needs beyond the weights whatever the batch: its own buffers, arenas,
/// thread stacks and the tokenizer. Measured: a short text at bge-en-icl's full size ran within
/// the weights' size (BENCHMARKS.md "full size"); smollm2 with two short texts and 2 threads
/// needed between 23 and 170 MiB of data segment beyond its files (`ulimit -d`: fp32, 514 MiB of
/// files, failed at 537 MiB and ran at 684; int8, 223 MiB, failed at 244 and ran at 293). A
/// margin on the safe side: a variant that does not fit fails at load or later, mid-run.
pub const RUNTIME_BASE: u64 = 256 << 20;

/// What a variant needs on the CPU: its weights as ONNX Runtime holds them, and the runtime and
/// activations beside them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub weights: u64,
    pub runtime: u64,
    /// Whether `weights` comes from the files (else from the architecture: a hub package whose
    /// files are not fetched yet).
    pub measured: bool,
}

impl Need {
    pub fn total(&self) -> u64 {
        self.weights + self.runtime
    }
}

impl fmt::Display for Need {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({} of weights{} + {} runtime and activations)",
            size(self.total()),
            size(self.weights),
            if self.measured { "" } else { ", estimated" },
            size(self.runtime)
        )
    }
}

/// What variant `spec` of `package` needs on the CPU with batches of up to `batch_tokens` tokens.
///
/// Weights: the variant's files (graph, external data, start states) where they are present, else
/// estimated from the architecture and the dtype; fp16 counts twice, since ONNX Runtime's CPU
/// kernels compute in fp32 and hold fp32 copies of the weights (the full-depth fp16 package, 14.2
/// GB, grew past 21 GiB while its session was created, BENCHMARKS.md "full size"). fp32 and int8
/// weights are packed into anonymous memory at about their size on disk (fp32 28.4 GB at full
/// size; int8 ran within its 7.1 GB + 350 MiB); a block-wise int8 x int8 variant adds its block
/// sums (`block_sums`). Runtime: [`RUNTIME_BASE`] and one batch's largest
/// activations in fp32 (gate, up and their product over the MLP width, a few hidden-wide tensors,
/// and the attention scores with their softmax).
pub fn cpu_need(package: &Package, spec: &VariantSpec, batch_tokens: usize) -> Need {
    let a = &package.manifest.architecture;
    let files: Option<Vec<u64>> = spec
        .files()
        .iter()
        .map(|f| std::fs::metadata(package.path(f)).ok().map(|m| m.len()))
        .collect();
    let (stored, measured) = match files {
        Some(sizes) => (sizes.iter().sum(), true),
        None => (estimated_weights(a, spec), false),
    };
    let weights = if spec.dtype == "float16" {
        stored.saturating_mul(2)
    } else {
        stored.saturating_add(block_sums(a, spec))
    };
    Need {
        weights,
        runtime: RUNTIME_BASE + activations(a, batch_tokens),
        measured,
    }
}

fn intermediate(a: &Architecture) -> u64 {
    a.intermediate.unwrap_or(a.hidden * 7 / 2) as u64
}

/// The MatMul weights of one model: q, k, v, o, gate, up and down of every layer.
fn matmul_weights(a: &Architecture) -> u64 {
    let h = a.hidden as u64;
    let q = (a.heads * a.head_dim) as u64;
    let kv = (a.kv_heads * a.head_dim) as u64;
    (h * q * 2 + h * kv * 2 + 3 * h * intermediate(a)) * a.layers as u64
}

/// Bytes ONNX Runtime holds for a block-wise int8 x int8 variant (`matmulnbits-int8`) beyond its
/// files: packing a `MatMulNBits` weight for int8 compute, MLAS keeps each block's 8-bit values
/// and fp32 scale (what the file holds) and adds an fp32 sum of the block (4 bytes per block of
/// `block_size`). Measured (BENCHMARKS.md "Block-wise int8 on a quiet machine"): the full-depth
/// package with blocks of 32 (7,990 MiB of files, 500 MiB of it the fp32 token table, which stays
/// mapped) held 8,366 MiB of anonymous memory for one short text, against 8,320 MiB of packed
/// MatMul weights by this count (6.98 G values, 218 M scales and 218 M sums); slice7b (2 layers)
/// 553 MiB (blocks of 32) and 469 MiB (128) against 520 and 442.
fn block_sums(a: &Architecture, spec: &VariantSpec) -> u64 {
    if spec.int8_kernel().as_deref() != Some("matmulnbits-int8") {
        return 0;
    }
    blocks(a, spec) * 4
}

/// The blocks of a `MatMulNBits` variant's MatMul weights (`quantization.block_size` along K, 32
/// where the manifest does not say); 0 for other variants.
fn blocks(a: &Architecture, spec: &VariantSpec) -> u64 {
    if !spec
        .int8_kernel()
        .is_some_and(|k| k.starts_with("matmulnbits"))
    {
        return 0;
    }
    let block = spec.block_size().filter(|&b| b > 0).unwrap_or(32);
    matmul_weights(a).div_ceil(block)
}

/// Bytes of weights the files of `spec` would hold: its parameters at the dtype's width (int8:
/// one byte per MatMul weight, and an fp32 scale per block for the block-wise recipes; the
/// embedding table in int8 or fp32 as the recipe says).
fn estimated_weights(a: &Architecture, spec: &VariantSpec) -> u64 {
    let matmuls = matmul_weights(a) + blocks(a, spec) * 4;
    let embeddings = a.vocab as u64 * a.hidden as u64;
    let int8_embeddings =
        spec.quantization.get("embeddings").and_then(|e| e.as_str()) == Some("int8");
    match spec.dtype.as_str() {
        "float16" => (matmuls + embeddings) * 2,
        "int8" | "uint8" => matmuls + embeddings * if int8_embeddings { 1 } else { 4 },
        _ if !spec.quantization.is_null() => {
            matmuls + embeddings * if int8_embeddings { 1 } else { 4 }
        }
        _ => (matmuls + embeddings) * 4,
    }
}

/// The largest fp32 activations of one batch of `tokens` tokens (one row of that length at worst).
fn activations(a: &Architecture, tokens: usize) -> u64 {
    let t = tokens as u64;
    let window = a.sliding_window.map_or(t, |w| t.min(w as u64));
    let mlp = t * (3 * intermediate(a) + 6 * a.hidden as u64) * 4;
    let scores = 2 * t * window * a.heads as u64 * 4;
    mlp + scores
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        let cases = [
            ("24G", Some(MemoryLimit::Bytes(24 << 30))),
            ("24GiB", Some(MemoryLimit::Bytes(24 << 30))),
            ("24gb", Some(MemoryLimit::Bytes(24 << 30))),
            ("512M", Some(MemoryLimit::Bytes(512 << 20))),
            ("1.5G", Some(MemoryLimit::Bytes(3 << 29))),
            ("64k", Some(MemoryLimit::Bytes(64 << 10))),
            ("1000", Some(MemoryLimit::Bytes(1000))),
            ("1000B", Some(MemoryLimit::Bytes(1000))),
            ("none", Some(MemoryLimit::Unchecked)),
            ("auto", Some(MemoryLimit::Detect)),
            ("", None),
            ("G", None),
            ("-1G", None),
            ("12 apples", None),
            ("0", None),
            ("1iB", None),
            ("1e3", None),
        ];
        for (text, want) in cases {
            let got = text.parse::<MemoryLimit>();
            match want {
                Some(w) => assert_eq!(got.unwrap(), w, "{text}"),
                None => {
                    let err = got.unwrap_err().to_string();
                    assert!(err.contains("--memory-limit"), "{text}: {err}");
                }
            }
        }
    }

    #[test]
    fn proc_cgroup_lines() {
        let cases = [
            (
                "0::/user.slice/app.scope\n",
                Some("/user.slice/app.scope"),
                None,
            ),
            (
                "12:memory:/docker/abc\n11:cpu,cpuacct:/docker/abc\n0::/\n",
                Some("/"),
                Some("/docker/abc"),
            ),
            (
                "4:memory:/process_api/27f0\n1:cpu:/\n",
                None,
                Some("/process_api/27f0"),
            ),
            ("3:cpuset,memory:/a\n", None, Some("/a")),
            ("2:cpu,memoryx:/b\nbroken line\n", None, None),
        ];
        for (text, v2, v1) in cases {
            let p = parse_proc_cgroup(text);
            assert_eq!(p.v2.as_deref(), v2, "{text}");
            assert_eq!(p.v1_memory.as_deref(), v1, "{text}");
        }
    }

    #[test]
    fn mountinfo_finds_cgroup2_and_v1_memory() {
        let text = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 /docker/abc /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
50 23 0:40 / /mnt/with\\040space rw - cgroup2 cgroup2 rw,nsdelegate
";
        let mounts = parse_mountinfo(text);
        assert_eq!(
            mounts,
            vec![
                CgroupMount {
                    v2: false,
                    root: "/docker/abc".into(),
                    point: "/sys/fs/cgroup/memory".into()
                },
                CgroupMount {
                    v2: true,
                    root: "/".into(),
                    point: "/sys/fs/cgroup/unified".into()
                },
                CgroupMount {
                    v2: true,
                    root: "/".into(),
                    point: "/mnt/with space".into()
                },
            ]
        );
    }

    #[test]
    fn limit_files() {
        let cases = [
            ("max\n", None),
            ("9223372036854771712\n", None),
            ("25769803776\n", Some(24u64 << 30)),
            ("1073741824", Some(1 << 30)),
            ("garbage", None),
        ];
        for (text, want) in cases {
            assert_eq!(parse_cgroup_limit(text), want, "{text:?}");
        }
        let limits = "\
Limit                     Soft Limit           Hard Limit           Units
Max data size             1073741824           unlimited            bytes
Max address space         unlimited            unlimited            bytes
";
        assert_eq!(rlimit(limits, "Max data size"), Some(1 << 30));
        assert_eq!(rlimit(limits, "Max address space"), None);
        assert_eq!(
            meminfo_available("MemTotal:  24683568 kB\nMemAvailable:   22729220 kB\n"),
            Some(22729220 * 1024)
        );
    }

    /// A directory laid out like `/`: `files` are (path, contents).
    fn fake_root(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let p = dir.path().join(path.trim_start_matches('/'));
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        dir
    }

    const MEMINFO: (&str, &str) = ("/proc/meminfo", "MemAvailable:   20971520 kB\n"); // 20 GiB

    #[test]
    fn detection_takes_the_tightest_source() {
        let v2_mount = "41 31 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let v1_mount = "35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        let gib = 1u64 << 30;
        #[allow(clippy::type_complexity)]
        let cases: Vec<(&str, Vec<(&str, String)>, Option<(u64, &str)>)> = vec![
            ("nothing readable", vec![], None),
            (
                "meminfo only",
                vec![(MEMINFO.0, MEMINFO.1.into())],
                Some((20 * gib, "MemAvailable")),
            ),
            (
                "v2: the parent's limit is the smaller, less its usage and not its inactive files",
                vec![
                    MEMINFO.into_owned(),
                    ("/proc/self/cgroup", "0::/a/b\n".into()),
                    ("/proc/self/mountinfo", v2_mount.into()),
                    ("/sys/fs/cgroup/a/b/memory.max", "max\n".into()),
                    ("/sys/fs/cgroup/a/memory.max", format!("{}\n", 8 * gib)),
                    ("/sys/fs/cgroup/a/memory.current", format!("{}\n", 3 * gib)),
                    (
                        "/sys/fs/cgroup/a/memory.stat",
                        format!("anon 1\ninactive_file {}\n", gib),
                    ),
                ],
                Some((6 * gib, "cgroup v2 limit 8.0 GiB in /sys/fs/cgroup/a/memory.max")),
            ),
            (
                "v2: own limit, no usage file",
                vec![
                    MEMINFO.into_owned(),
                    ("/proc/self/cgroup", "0::/a/b\n".into()),
                    ("/proc/self/mountinfo", v2_mount.into()),
                    ("/sys/fs/cgroup/a/b/memory.max", format!("{}\n", 2 * gib)),
                    ("/sys/fs/cgroup/a/memory.max", format!("{}\n", 8 * gib)),
                ],
                Some((2 * gib, "/sys/fs/cgroup/a/b/memory.max")),
            ),
            (
                "v2 at the namespace root (a container): no limit file",
                vec![
                    MEMINFO.into_owned(),
                    ("/proc/self/cgroup", "0::/\n".into()),
                    ("/proc/self/mountinfo", v2_mount.into()),
                ],
                Some((20 * gib, "MemAvailable")),
            ),
            (
                "v1 with a container's mount root",
                vec![
                    MEMINFO.into_owned(),
                    ("/proc/self/cgroup", "4:memory:/docker/abc\n0::/\n".into()),
                    (
                        "/proc/self/mountinfo",
                        "35 31 0:32 /docker/abc /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
                            .into(),
                    ),
                    (
                        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
                        format!("{}\n", 4 * gib),
                    ),
                    (
                        "/sys/fs/cgroup/memory/memory.usage_in_bytes",
                        format!("{}\n", gib),
                    ),
                    (
                        "/sys/fs/cgroup/memory/memory.stat",
                        format!("cache 5\ntotal_inactive_file {}\n", gib / 2),
                    ),
                ],
                Some((
                    4 * gib - gib / 2,
                    "cgroup v1 limit 4.0 GiB in /sys/fs/cgroup/memory/memory.limit_in_bytes",
                )),
            ),
            (
                "v1 unlimited, as on this project's machines",
                vec![
                    MEMINFO.into_owned(),
                    ("/proc/self/cgroup", "4:memory:/p/x\n".into()),
                    ("/proc/self/mountinfo", v1_mount.into()),
                    (
                        "/sys/fs/cgroup/memory/p/x/memory.limit_in_bytes",
                        "9223372036854771712\n".into(),
                    ),
                    (
                        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
                        "9223372036854771712\n".into(),
                    ),
                ],
                Some((20 * gib, "MemAvailable")),
            ),
            (
                "RLIMIT_DATA less VmData",
                vec![
                    MEMINFO.into_owned(),
                    (
                        "/proc/self/limits",
                        "Max data size             1073741824           unlimited            bytes\n\
                         Max address space         unlimited            unlimited            bytes\n"
                            .into(),
                    ),
                    ("/proc/self/status", "VmSize:  999999 kB\nVmData:   102400 kB\n".into()),
                ],
                Some((gib - (100 << 20), "RLIMIT_DATA 1.0 GiB less the 100.0 MiB")),
            ),
        ];
        for (what, files, want) in cases {
            let files: Vec<(&str, &str)> = files.iter().map(|(p, t)| (*p, t.as_str())).collect();
            let root = fake_root(&files);
            let got = detect(root.path());
            match (got, want) {
                (None, None) => {}
                (Some(a), Some((bytes, source))) => {
                    assert_eq!(a.bytes, bytes, "{what}: {a}");
                    assert!(a.source.contains(source), "{what}: {a}");
                }
                (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn estimates_match_the_full_size_measurements() {
        // bge-en-icl: 7.11 B parameters; fp32 28.4 GB, int8 (w7a8, int8 embedding rows) 7.12 GB,
        // fp16 14.2 GB on disk (BENCHMARKS.md "full size").
        let a: Architecture = serde_json::from_value(serde_json::json!({
            "layers": 32, "hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8,
            "head_dim": 128, "vocab": 32003, "sliding_window": 4096}))
        .unwrap();
        let spec = |dtype: &str, q: serde_json::Value| -> VariantSpec {
            serde_json::from_value(serde_json::json!({
                "file": "m.onnx", "data": null, "dtype": dtype, "inputs": [], "output": "h",
                "sha256": {}, "quantization": q}))
            .unwrap()
        };
        let gb = |b: u64| (b as f64 / 1e9 * 100.0).round() / 100.0;
        assert_eq!(
            gb(estimated_weights(
                &a,
                &spec("float32", serde_json::json!(null))
            )),
            28.44
        );
        assert_eq!(
            gb(estimated_weights(
                &a,
                &spec("float16", serde_json::json!(null))
            )),
            14.22
        );
        let w7a8 = serde_json::json!({"method": "w8a8", "embeddings": "int8"});
        assert_eq!(gb(estimated_weights(&a, &spec("int8", w7a8.clone()))), 7.11);
        assert_eq!(block_sums(&a, &spec("int8", w7a8)), 0);
        // Blocks of 32, fp32 token table: 8.38 GB of files (7,990.1 MiB measured), and ONNX
        // Runtime adds a 4-byte sum per block when it packs them (8,366 MiB of anonymous memory
        // measured for the MatMuls' 8,320 MiB by this count).
        let b32 = serde_json::json!({"method": "matmulnbits", "kernel": "matmulnbits-int8",
            "block_size": 32, "accuracy_level": 4});
        assert_eq!(gb(estimated_weights(&a, &spec("int8", b32.clone()))), 8.38);
        assert_eq!(gb(block_sums(&a, &spec("int8", b32))), 0.87);
        let b128 = serde_json::json!({"method": "matmulnbits", "kernel": "matmulnbits-int8",
            "block_size": 128, "accuracy_level": 4});
        assert_eq!(gb(block_sums(&a, &spec("int8", b128))), 0.22);
        // The weight-only kernel computes in fp32 from the same files: no sums.
        let acc1 = serde_json::json!({"method": "matmulnbits", "kernel": "matmulnbits-fp32",
            "block_size": 32, "accuracy_level": 1});
        assert_eq!(block_sums(&a, &spec("int8", acc1)), 0);
        // 512-token CPU batches: 121 MB of MLP and hidden-wide tensors, 67 MB of attention scores.
        assert_eq!(
            activations(&a, 512),
            512 * (3 * 14336 + 6 * 4096) * 4 + 2 * 512 * 512 * 32 * 4
        );
    }

    trait Owned {
        fn into_owned(self) -> (&'static str, String);
    }

    impl Owned for (&'static str, &'static str) {
        fn into_owned(self) -> (&'static str, String) {
            (self.0, self.1.to_string())
        }
    }
}
