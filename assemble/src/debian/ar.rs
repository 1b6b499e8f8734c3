//! The common `ar` format a .deb is wrapped in: an 8-byte magic, then
//! members each behind a 60-byte ASCII header, data padded to even length.

/// One archive member, borrowing the archive's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member<'a> {
    pub name: &'a str,
    pub data: &'a [u8],
}

const MAGIC: &[u8] = b"!<arch>\n";
const HEADER: usize = 60;

/// Lists the members of an `ar` archive. GNU-style names (`name/`) are
/// trimmed; the long-name table members used by GNU ar never occur in
/// .debs, so `//` and `/` members are returned as they are.
pub fn members(data: &[u8]) -> Result<Vec<Member<'_>>, String> {
    let mut rest = data.strip_prefix(MAGIC).ok_or("not an ar archive")?;
    let mut out = Vec::new();
    while !rest.is_empty() {
        if rest == b"\n" {
            break; // some writers pad the end
        }
        if rest.len() < HEADER {
            return Err("truncated member header".into());
        }
        let (h, body) = rest.split_at(HEADER);
        if &h[58..60] != b"`\n" {
            return Err("bad member header magic".into());
        }
        let name = std::str::from_utf8(&h[..16])
            .map_err(|_| "member name is not UTF-8")?
            .trim_end();
        let name = name
            .strip_suffix('/')
            .filter(|n| !n.is_empty())
            .unwrap_or(name);
        let size: usize = std::str::from_utf8(&h[48..58])
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| format!("member {name:?}: bad size field"))?;
        if body.len() < size {
            return Err(format!("member {name:?}: truncated data"));
        }
        out.push(Member {
            name,
            data: &body[..size],
        });
        let padded = size + (size & 1);
        rest = body.get(padded..).unwrap_or(&[]);
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) fn build(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    for (name, data) in members {
        let h = format!(
            "{:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n",
            name,
            0,
            0,
            0,
            "100644",
            data.len()
        );
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        if data.len() % 2 == 1 {
            out.push(b'\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_padding() {
        let a = build(&[("debian-binary", b"2.0\n"), ("odd/", b"abc"), ("x", b"")]);
        let m = members(&a).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].name, "debian-binary");
        assert_eq!(m[0].data, b"2.0\n");
        assert_eq!(m[1].name, "odd");
        assert_eq!(m[1].data, b"abc");
        assert_eq!(m[2].data, b"");
    }

    #[test]
    fn rejects_garbage() {
        assert!(members(b"hello").is_err());
        let mut a = build(&[("f", b"abcdef")]);
        a.truncate(a.len() - 2);
        assert!(members(&a).is_err());
        let mut b = build(&[("f", b"ab")]);
        b[8 + 48] = b'x';
        assert!(members(&b).is_err());
    }
}
