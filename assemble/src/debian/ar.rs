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

/// A member header's name (GNU `name/` trimmed) and data size.
fn header(h: &[u8]) -> Result<(&str, u64), String> {
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
    let size = std::str::from_utf8(&h[48..58])
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| format!("member {name:?}: bad size field"))?;
    Ok((name, size))
}

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
        let (name, size) = header(h)?;
        let size = usize::try_from(size).map_err(|_| format!("member {name:?}: too large"))?;
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

/// Reads members' headers from a stream: the caller reads or skips each
/// member's data (and its padding) before asking for the next header.
pub struct Stream<R> {
    inner: R,
    started: bool,
}

impl<R: std::io::Read> Stream<R> {
    /// Members of the archive `inner`, positioned at its first byte.
    pub fn new(inner: R) -> Self {
        Stream {
            inner,
            started: false,
        }
    }

    /// The next member's name and data length, leaving the stream at its
    /// data; `None` at the end of the archive.
    pub fn next_header(&mut self) -> Result<Option<(String, u64)>, String> {
        let io = |e: std::io::Error| format!("reading: {e}");
        if !self.started {
            let mut magic = [0u8; MAGIC.len()];
            self.inner.read_exact(&mut magic).map_err(io)?;
            if magic != MAGIC {
                return Err("not an ar archive".into());
            }
            self.started = true;
        }
        let mut h = [0u8; HEADER];
        let mut got = 0;
        while got < HEADER {
            match self.inner.read(&mut h[got..]).map_err(io)? {
                0 => break,
                n => got += n,
            }
        }
        // The end, possibly after a writer's padding newline.
        if got == 0 || (got == 1 && h[0] == b'\n') {
            return Ok(None);
        }
        if got < HEADER {
            return Err("truncated member header".into());
        }
        let (name, size) = header(&h)?;
        Ok(Some((name.to_string(), size)))
    }

    /// Skips a member's data of `size` bytes and its padding.
    pub fn skip(&mut self, size: u64) -> Result<(), String> {
        let padded = size + (size & 1);
        let n = std::io::copy(
            &mut std::io::Read::take(&mut self.inner, padded),
            &mut std::io::sink(),
        )
        .map_err(|e| format!("reading: {e}"))?;
        // The last member's padding may be missing.
        if n < size {
            return Err("truncated member data".into());
        }
        Ok(())
    }

    /// The underlying stream (at the current member's data after
    /// [`Stream::next_header`]).
    pub fn inner(&mut self) -> &mut R {
        &mut self.inner
    }
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
    fn stream_reads_what_members_reads() {
        let a = build(&[("debian-binary", b"2.0\n"), ("odd/", b"abc"), ("x", b"z")]);
        let mut s = Stream::new(&a[..]);
        let mut got = Vec::new();
        while let Some((name, size)) = s.next_header().unwrap() {
            let mut data = vec![0; usize::try_from(size).unwrap()];
            std::io::Read::read_exact(s.inner(), &mut data).unwrap();
            if size % 2 == 1 {
                s.skip(0).unwrap();
                std::io::Read::read_exact(s.inner(), &mut [0]).unwrap();
            }
            got.push((name, data));
        }
        let m = members(&a).unwrap();
        assert_eq!(got.len(), m.len());
        for ((n, d), m) in got.iter().zip(&m) {
            assert_eq!((n.as_str(), &d[..]), (m.name, m.data));
        }
        let mut bad = Stream::new(&b"hello, not an archive"[..]);
        assert!(bad.next_header().is_err());
        let mut short = build(&[("f", b"abcdef")]);
        short.truncate(short.len() - 2);
        let mut s = Stream::new(&short[..]);
        let (_, size) = s.next_header().unwrap().unwrap();
        assert!(s.skip(size).is_err());
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
