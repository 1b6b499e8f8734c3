//! What a container's setup process tells the init over the report pipe.
//!
//! Each message is one write of at most [`MAX_MSG`] bytes, below
//! `PIPE_BUF`, so messages from several writers never interleave.

use std::fmt;
use std::io;
use thiserror::Error;

/// Longest step description sent; longer ones are cut.
const MAX_STEP: usize = 1024;
/// Longest encoded message.
pub const MAX_MSG: usize = 1 + 4 + 2 + MAX_STEP;
// Pipe writes up to PIPE_BUF are atomic.
const _: () = assert!(MAX_MSG <= libc::PIPE_BUF);

const TAG_FAILED: u8 = 2;

/// A setup step that failed in the child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// What was being done, e.g. `bind /a to /b`.
    pub step: String,
    /// The system call's errno; 0 when no system call failed.
    pub errno: i32,
}

impl Failure {
    /// A failed system call.
    pub fn os(step: impl Into<String>, e: &io::Error) -> Failure {
        Failure {
            step: step.into(),
            errno: e.raw_os_error().unwrap_or(0),
        }
    }

    /// A failure with no errno behind it.
    pub fn other(step: impl Into<String>) -> Failure {
        Failure {
            step: step.into(),
            errno: 0,
        }
    }

    /// The system call's error, if there was one.
    pub fn os_error(&self) -> Option<io::Error> {
        (self.errno != 0).then(|| io::Error::from_raw_os_error(self.errno))
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.os_error() {
            Some(e) => write!(f, "{}: {e}", self.step),
            None => f.write_str(&self.step),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildMsg {
    /// Setup failed; nothing was exec'd.
    Failed(Failure),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("truncated message")]
    Truncated,
    #[error("unknown message tag {0}")]
    UnknownTag(u8),
    #[error("step description is not UTF-8")]
    NotUtf8,
}

impl ChildMsg {
    /// Tag, then little-endian fields; the step is length-prefixed.
    pub fn encode(&self) -> Vec<u8> {
        match self {
            ChildMsg::Failed(f) => {
                let mut end = f.step.len().min(MAX_STEP);
                while !f.step.is_char_boundary(end) {
                    end -= 1;
                }
                let step = &f.step.as_bytes()[..end];
                let mut out = Vec::with_capacity(1 + 4 + 2 + step.len());
                out.push(TAG_FAILED);
                out.extend_from_slice(&f.errno.to_le_bytes());
                // At most MAX_STEP (1024) bytes.
                #[allow(clippy::cast_possible_truncation)]
                let step_len = step.len() as u16;
                out.extend_from_slice(&step_len.to_le_bytes());
                out.extend_from_slice(step);
                out
            }
        }
    }

    /// Decodes the message at the start of `buf`; returns it and the
    /// number of bytes it took.
    pub fn decode(buf: &[u8]) -> Result<(ChildMsg, usize), DecodeError> {
        let take = |at: usize, n: usize| buf.get(at..at + n).ok_or(DecodeError::Truncated);
        let i32_at = |at| take(at, 4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        match *buf.first().ok_or(DecodeError::Truncated)? {
            TAG_FAILED => {
                let errno = i32_at(1)?;
                let len = take(5, 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)?;
                let step = std::str::from_utf8(take(7, len)?).map_err(|_| DecodeError::NotUtf8)?;
                let f = Failure {
                    step: step.to_string(),
                    errno,
                };
                Ok((ChildMsg::Failed(f), 7 + len))
            }
            tag => Err(DecodeError::UnknownTag(tag)),
        }
    }

    /// Every message in `buf`, which must end on a message boundary.
    pub fn decode_all(mut buf: &[u8]) -> Result<Vec<ChildMsg>, DecodeError> {
        let mut out = Vec::new();
        while !buf.is_empty() {
            let (msg, used) = ChildMsg::decode(buf)?;
            out.push(msg);
            buf = &buf[used..];
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<ChildMsg> {
        vec![
            ChildMsg::Failed(Failure {
                step: "bind /var/lib/é to /data".into(),
                errno: libc::ENOENT,
            }),
            ChildMsg::Failed(Failure::other("")),
        ]
    }

    #[test]
    fn round_trip() {
        let mut stream = Vec::new();
        for m in samples() {
            let bytes = m.encode();
            assert!(bytes.len() <= MAX_MSG);
            assert_eq!(ChildMsg::decode(&bytes), Ok((m.clone(), bytes.len())));
            stream.extend_from_slice(&bytes);
        }
        assert_eq!(ChildMsg::decode_all(&stream), Ok(samples()));
        assert_eq!(ChildMsg::decode_all(&[]), Ok(vec![]));
    }

    #[test]
    fn truncated_input_is_rejected() {
        for m in samples() {
            let bytes = m.encode();
            for cut in 0..bytes.len() {
                assert_eq!(
                    ChildMsg::decode(&bytes[..cut]),
                    Err(DecodeError::Truncated),
                    "{m:?} cut at {cut}"
                );
            }
            let mut two = bytes.clone();
            two.extend_from_slice(&bytes[..bytes.len() - 1]);
            assert_eq!(ChildMsg::decode_all(&two), Err(DecodeError::Truncated));
        }
    }

    #[test]
    fn garbage_is_rejected() {
        assert_eq!(ChildMsg::decode(b"E"), Err(DecodeError::UnknownTag(b'E')));
        assert_eq!(
            ChildMsg::decode(&[TAG_FAILED, 0, 0, 0, 0, 1, 0, 0xff]),
            Err(DecodeError::NotUtf8)
        );
    }

    #[test]
    fn long_steps_are_cut_on_a_char_boundary() {
        let step = "é".repeat(MAX_STEP);
        let bytes = ChildMsg::Failed(Failure::other(step)).encode();
        assert!(bytes.len() <= MAX_MSG);
        let Ok((ChildMsg::Failed(f), _)) = ChildMsg::decode(&bytes) else {
            panic!("does not decode");
        };
        assert_eq!(f.step, "é".repeat(MAX_STEP / 2));
    }

    #[test]
    fn failures_read_like_errors() {
        let f = Failure::os("mount /proc", &io::Error::from_raw_os_error(libc::EPERM));
        assert_eq!(f.errno, libc::EPERM);
        assert!(f.to_string().starts_with("mount /proc: "), "{f}");
        assert_eq!(
            Failure::other("sh: not found in PATH").to_string(),
            "sh: not found in PATH"
        );
        assert!(Failure::other("x").os_error().is_none());
    }
}
