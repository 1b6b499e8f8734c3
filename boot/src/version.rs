//! Recipe versions, ordered as semver orders them: numeric dot-separated
//! parts (missing ones are 0, so `2` is `2.0.0`), a release above its
//! pre-releases (`1.0.0-rc.1` < `1.0.0`), pre-release identifiers
//! numeric below alphanumeric, build metadata (`+...`) ignored.

use core::cmp::Ordering;

/// Compares two versions; `None` if either is not one.
pub fn compare(a: &str, b: &str) -> Option<Ordering> {
    let (a_core, a_pre) = split(a)?;
    let (b_core, b_pre) = split(b)?;
    let mut ai = a_core.split('.');
    let mut bi = b_core.split('.');
    loop {
        match (ai.next(), bi.next()) {
            (None, None) => break,
            (x, y) => {
                let x = number(x.unwrap_or("0"))?;
                let y = number(y.unwrap_or("0"))?;
                match x.cmp(&y) {
                    Ordering::Equal => {}
                    other => return Some(other),
                }
            }
        }
    }
    match (a_pre, b_pre) {
        (None, None) => Some(Ordering::Equal),
        (None, Some(_)) => Some(Ordering::Greater),
        (Some(_), None) => Some(Ordering::Less),
        (Some(x), Some(y)) => compare_pre(x, y),
    }
}

/// The numeric core and the pre-release, build metadata dropped.
fn split(v: &str) -> Option<(&str, Option<&str>)> {
    let v = v.split_once('+').map_or(v, |(v, _)| v);
    let (core, pre) = match v.split_once('-') {
        Some((c, p)) => (c, Some(p)),
        None => (v, None),
    };
    if core.is_empty() || pre.is_some_and(str::is_empty) {
        return None;
    }
    Some((core, pre))
}

fn number(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn compare_pre(a: &str, b: &str) -> Option<Ordering> {
    let mut ai = a.split('.');
    let mut bi = b.split('.');
    loop {
        let (x, y) = match (ai.next(), bi.next()) {
            (None, None) => return Some(Ordering::Equal),
            // More identifiers rank higher when the rest are equal.
            (None, Some(_)) => return Some(Ordering::Less),
            (Some(_), None) => return Some(Ordering::Greater),
            (Some(x), Some(y)) => (x, y),
        };
        if x.is_empty() || y.is_empty() {
            return None;
        }
        let o = match (number(x), number(y)) {
            (Some(m), Some(n)) => m.cmp(&n),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => x.cmp(y),
        };
        if o != Ordering::Equal {
            return Some(o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn semver_order() {
        let ordered = [
            "0.9",
            "1.0.0-alpha",
            "1.0.0-alpha.1",
            "1.0.0-alpha.beta",
            "1.0.0-beta",
            "1.0.0-beta.2",
            "1.0.0-beta.11",
            "1.0.0-rc.1",
            "1",
            "1.0.1",
            "1.2",
            "1.10.0",
            "2",
        ];
        for (i, a) in ordered.iter().enumerate() {
            for (j, b) in ordered.iter().enumerate() {
                assert_eq!(compare(a, b), Some(i.cmp(&j)), "{a} vs {b}");
            }
        }
        assert_eq!(compare("1.0.0+build.5", "1.0.0"), Some(Ordering::Equal));
        assert_eq!(compare("1.0.0", "1.0.0.0"), Some(Ordering::Equal));
        for bad in ["", "v1", "1..2", "1.x", "1.0-", "-rc"] {
            assert_eq!(compare(bad, "1"), None, "{bad:?}");
        }
    }
}
