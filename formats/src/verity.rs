//! dm-verity hash trees (format 1, sha256, 4096-byte data and hash
//! blocks), as `veritysetup format` writes them: a superblock, then the
//! tree's levels, the top one first. The root hash is what a kernel
//! command line (or a UKI's `.cmdline`) pins.
//!
//! The data is read once, in order; memory holds the tree (32 bytes per
//! 4 KiB of data), never the data.

use sha2::{Digest, Sha256};
use std::io::{self, Read, Write};

/// Data and hash block size.
pub const BLOCK: u64 = 4096;
const BLOCK_BYTES: usize = 4096;
const DIGEST: usize = 32;
/// Hashes per hash block.
const FANOUT: usize = BLOCK_BYTES / DIGEST;

/// What [`write_hash_tree`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HashTree {
    /// The root hash.
    pub root: [u8; 32],
    /// Data blocks covered.
    pub data_blocks: u64,
    /// Bytes written: superblock and tree.
    pub len: u64,
}

/// `sha256(salt || block)`: format 1 puts the salt first.
fn hash(salt: &[u8], block: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(block);
    h.finalize().into()
}

/// The 512-byte superblock, padded to a hash block.
fn superblock(uuid: [u8; 16], data_blocks: u64, salt: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_BYTES];
    b[..8].copy_from_slice(b"verity\0\0");
    b[8..12].copy_from_slice(&1u32.to_le_bytes());
    b[12..16].copy_from_slice(&1u32.to_le_bytes());
    b[16..32].copy_from_slice(&uuid);
    b[32..38].copy_from_slice(b"sha256");
    b[64..68].copy_from_slice(&4096u32.to_le_bytes());
    b[68..72].copy_from_slice(&4096u32.to_le_bytes());
    b[72..80].copy_from_slice(&data_blocks.to_le_bytes());
    b[80..82].copy_from_slice(&u16::try_from(salt.len()).unwrap_or(0).to_le_bytes());
    b[88..88 + salt.len()].copy_from_slice(salt);
    b
}

/// Packs `hashes` into zero-padded hash blocks.
fn pack(hashes: &[[u8; 32]]) -> Vec<u8> {
    let blocks = hashes.len().div_ceil(FANOUT).max(1);
    let mut out = vec![0u8; blocks * BLOCK_BYTES];
    for (i, h) in hashes.iter().enumerate() {
        out[i * DIGEST..(i + 1) * DIGEST].copy_from_slice(h);
    }
    out
}

/// Reads `data_len` bytes of data (a whole number of 4 KiB blocks, at
/// least two) and writes the superblock and hash tree to `out`.
/// `salt` is at most 256 bytes.
pub fn write_hash_tree(
    data: &mut dyn Read,
    data_len: u64,
    salt: &[u8],
    uuid: [u8; 16],
    out: &mut dyn Write,
) -> io::Result<HashTree> {
    let invalid = |m: &str| io::Error::new(io::ErrorKind::InvalidInput, m.to_string());
    if !data_len.is_multiple_of(BLOCK) || data_len < 2 * BLOCK {
        return Err(invalid(
            "verity data must be two or more whole 4 KiB blocks",
        ));
    }
    if salt.len() > 256 {
        return Err(invalid("verity salt longer than 256 bytes"));
    }
    let data_blocks = data_len / BLOCK;
    // Level 0: a hash per data block.
    let mut leaves = Vec::with_capacity(usize::try_from(data_blocks).unwrap_or(0));
    let mut block = vec![0u8; BLOCK_BYTES];
    for _ in 0..data_blocks {
        data.read_exact(&mut block)?;
        leaves.push(hash(salt, &block));
    }
    // Each level packs the hashes of the one below, up to a single block.
    let mut levels = vec![pack(&leaves)];
    while levels.last().is_some_and(|l| l.len() > BLOCK_BYTES) {
        let below = levels.last().map_or(&[][..], Vec::as_slice);
        let hashes: Vec<[u8; 32]> = below.chunks(BLOCK_BYTES).map(|b| hash(salt, b)).collect();
        levels.push(pack(&hashes));
    }
    let top = levels.last().map_or(&[][..], Vec::as_slice);
    let root = hash(salt, top);
    let sb = superblock(uuid, data_blocks, salt);
    out.write_all(&sb)?;
    let mut len = sb.len() as u64;
    for level in levels.iter().rev() {
        out.write_all(level)?;
        len += level.len() as u64;
    }
    out.flush()?;
    Ok(HashTree {
        root,
        data_blocks,
        len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// `veritysetup verify` accepts kiln's tree and root hash, and refuses
    /// them once a data byte changes. Sizes give one, two and three
    /// levels.
    #[test]
    fn veritysetup_verifies_the_tree() {
        let dir = std::env::temp_dir().join(format!("kiln-verity-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let salt = [0x5a; 32];
        for blocks in [2u64, 300, 20_000] {
            let data: Vec<u8> = (0..blocks * BLOCK).map(|i| (i % 253) as u8).collect();
            let mut tree = Vec::new();
            let t = write_hash_tree(&mut &data[..], data.len() as u64, &salt, [3; 16], &mut tree)
                .unwrap();
            assert_eq!(t.len, tree.len() as u64);
            let (d, h) = (dir.join("data"), dir.join("hash"));
            std::fs::write(&d, &data).unwrap();
            std::fs::write(&h, &tree).unwrap();
            let verify = || {
                Command::new("veritysetup")
                    .arg("verify")
                    .arg(&d)
                    .arg(&h)
                    .arg(hex(&t.root))
                    .output()
                    .expect("veritysetup (scripts/install-deps.sh installs cryptsetup-bin)")
            };
            let ok = verify();
            assert!(
                ok.status.success(),
                "{blocks} blocks: {}",
                String::from_utf8_lossy(&ok.stderr)
            );
            let mut bad = data.clone();
            let last = bad.len() - BLOCK_BYTES;
            bad[last + 7] ^= 1;
            std::fs::write(&d, &bad).unwrap();
            assert!(
                !verify().status.success(),
                "{blocks} blocks: corruption passed"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn refuses_partial_blocks() {
        let data = vec![0u8; 5000];
        assert!(write_hash_tree(&mut &data[..], 5000, &[], [0; 16], &mut Vec::new()).is_err());
    }
}
