//! fnmatch-style matching of module alias patterns against modaliases:
//! `*` (any run), `?` (one byte), `[...]` (set, with ranges and `!`/`^`
//! negation), as kmod does. No escapes: aliases never use them.

/// Whether `text` matches the whole of `pattern`.
pub fn matches(pattern: &str, text: &str) -> bool {
    let p = pattern.as_bytes();
    let t = text.as_bytes();
    let (mut pi, mut ti) = (0usize, 0usize);
    // Where to resume after the last `*`: (pattern index after it, text index).
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() {
            match p[pi] {
                b'*' => {
                    star = Some((pi + 1, ti));
                    pi += 1;
                    continue;
                }
                b'?' => {
                    pi += 1;
                    ti += 1;
                    continue;
                }
                b'[' => {
                    if let Some((ok, next)) = class(p, pi, t[ti]) {
                        if ok {
                            pi = next;
                            ti += 1;
                            continue;
                        }
                    } else if t[ti] == b'[' {
                        // An unterminated `[` is a literal.
                        pi += 1;
                        ti += 1;
                        continue;
                    }
                }
                c if c == t[ti] => {
                    pi += 1;
                    ti += 1;
                    continue;
                }
                _ => {}
            }
        }
        // Mismatch: let the last `*` swallow one more byte.
        match star {
            Some((sp, st)) => {
                pi = sp;
                ti = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Matches byte `c` against the class starting at `p[start] == b'['`.
/// Returns (matched, index after `]`), or None if the class is unterminated.
fn class(p: &[u8], start: usize, c: u8) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = matches!(p.get(i), Some(b'!') | Some(b'^'));
    if negate {
        i += 1;
    }
    let mut hit = false;
    let mut first = true;
    loop {
        let lo = *p.get(i)?;
        if lo == b']' && !first {
            return Some((hit != negate, i + 1));
        }
        first = false;
        if p.get(i + 1) == Some(&b'-') && p.get(i + 2).is_some_and(|&h| h != b']') {
            let hi = p[i + 2];
            if lo <= c && c <= hi {
                hit = true;
            }
            i += 3;
        } else {
            if lo == c {
                hit = true;
            }
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn literals_and_wildcards() {
        assert!(matches("abc", "abc"));
        assert!(!matches("abc", "abd"));
        assert!(!matches("abc", "abcd"));
        assert!(!matches("abcd", "abc"));
        assert!(matches("a?c", "abc"));
        assert!(!matches("a?c", "ac"));
        assert!(matches("*", ""));
        assert!(matches("a*", "a"));
        assert!(matches("*c", "abc"));
        assert!(matches("a*b*c", "axxbyyc"));
        assert!(!matches("a*b*c", "axxbyy"));
        assert!(matches("a**c", "abc"));
    }

    #[test]
    fn classes() {
        assert!(matches("[abc]", "b"));
        assert!(!matches("[abc]", "d"));
        assert!(matches("[a-c]x", "bx"));
        assert!(!matches("[!a-c]x", "bx"));
        assert!(matches("[^a-c]x", "dx"));
        assert!(matches("[]]", "]"));
        assert!(matches("[a-]", "-"));
        assert!(matches("[", "["));
        assert!(!matches("[", "a"));
    }

    #[test]
    fn real_modaliases() {
        // virtio_pci and virtio_blk aliases from Debian 6.1 modules.
        let dev = "pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00";
        assert!(matches("pci:v00001AF4d*sv*sd*bc*sc*i*", dev));
        assert!(!matches("pci:v00008086d*sv*sd*bc*sc*i*", dev));
        assert!(matches("virtio:d00000002v*", "virtio:d00000002v00001AF4"));
        assert!(!matches("virtio:d00000002v*", "virtio:d00000001v00001AF4"));
        assert!(matches(
            "cpu:type:x86,ven*fam*mod*:feature:*0099*",
            "cpu:type:x86,ven0000fam0006mod003F:feature:,0000,0001,0099,00E8"
        ));
        assert!(matches(
            "pci:v*d*sv*sd*bc01sc08i02*",
            "pci:v0000144Dd0000A808sv0000144Dsd0000A801bc01sc08i02"
        ));
    }
}
