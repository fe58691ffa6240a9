//! Finds where a chunked body ends without decoding it.
//!
//! The HTTP/1.1 relay passes chunked bodies through byte for byte (both
//! sides speak HTTP/1.1, so the framing is already right); it only needs
//! to know which byte is the last one, to reuse the connection after it.

/// Longest chunk-size line (size and extensions) or trailer line accepted.
const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// In a chunk-size line: the size so far, whether a digit was seen,
    /// whether extensions or whitespace started, line length so far.
    Size {
        size: u64,
        digit: bool,
        rest: bool,
        len: usize,
    },
    /// After the size line's CR.
    SizeLf {
        size: u64,
    },
    /// Inside chunk data.
    Data(u64),
    /// After chunk data: CR then LF.
    DataCr,
    DataLf,
    /// In the trailer section: length of the current line, whether its CR
    /// was seen.
    Trailer {
        len: usize,
        cr: bool,
    },
    Done,
}

/// Why a chunked body cannot be framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed chunked body")]
pub struct Malformed;

/// An incremental scanner over a chunked body.
#[derive(Debug, Clone)]
pub struct Scanner {
    state: State,
}

impl Default for Scanner {
    fn default() -> Self {
        Self::new()
    }
}

impl Scanner {
    pub fn new() -> Self {
        Self { state: State::Size { size: 0, digit: false, rest: false, len: 0 } }
    }

    /// Scans the next bytes of the body. Returns how many of them belong
    /// to it and whether the body ended there (then the rest of `bytes`,
    /// if any, is not part of it).
    pub fn scan(&mut self, bytes: &[u8]) -> Result<(usize, bool), Malformed> {
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            self.state = match self.state {
                State::Size { size, digit, rest, len } => {
                    if len >= MAX_LINE {
                        return Err(Malformed);
                    }
                    match b {
                        b'\r' if digit => State::SizeLf { size },
                        _ if rest => State::Size { size, digit, rest, len: len + 1 },
                        b';' | b' ' | b'\t' if digit => State::Size { size, digit, rest: true, len: len + 1 },
                        _ => {
                            let value = (b as char).to_digit(16).ok_or(Malformed)?;
                            let size =
                                size.checked_mul(16).and_then(|s| s.checked_add(value.into())).ok_or(Malformed)?;
                            State::Size { size, digit: true, rest, len: len + 1 }
                        }
                    }
                }
                State::SizeLf { size } => match b {
                    b'\n' if size == 0 => State::Trailer { len: 0, cr: false },
                    b'\n' => State::Data(size),
                    _ => return Err(Malformed),
                },
                State::Data(left) => {
                    // Skip the data in one step.
                    let take = left.min((bytes.len() - i) as u64);
                    i += take as usize;
                    self.state = if take == left { State::DataCr } else { State::Data(left - take) };
                    continue;
                }
                State::DataCr if b == b'\r' => State::DataLf,
                State::DataLf if b == b'\n' => State::Size { size: 0, digit: false, rest: false, len: 0 },
                State::DataCr | State::DataLf => return Err(Malformed),
                State::Trailer { len, cr: false } => match b {
                    b'\r' => State::Trailer { len, cr: true },
                    _ if len >= MAX_LINE => return Err(Malformed),
                    _ => State::Trailer { len: len + 1, cr: false },
                },
                State::Trailer { len, cr: true } => match b {
                    b'\n' if len == 0 => State::Done,
                    b'\n' => State::Trailer { len: 0, cr: false },
                    _ => return Err(Malformed),
                },
                State::Done => return Ok((i, true)),
            };
            i += 1;
        }
        Ok((i, self.state == State::Done))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(body: &[u8]) -> Result<(usize, bool), Malformed> {
        Scanner::new().scan(body)
    }

    #[test]
    fn finds_the_end() {
        let body = b"5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\n\r\nGET / HTTP/1.1";
        assert_eq!(whole(body), Ok((body.len() - 14, true)));
        let trailers = b"0\r\nX-Sum: 1\r\nX-B: 2\r\n\r\n";
        assert_eq!(whole(trailers), Ok((trailers.len(), true)));
        let spaced = b"A \r\n0123456789\r\n0\r\n\r\n";
        assert_eq!(whole(spaced), Ok((spaced.len(), true)));
    }

    #[test]
    fn byte_by_byte_matches_whole() {
        let body = b"3\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nT: v\r\n\r\n";
        let mut scanner = Scanner::new();
        for (i, b) in body.iter().enumerate() {
            let (used, done) = scanner.scan(std::slice::from_ref(b)).unwrap();
            assert_eq!(used, 1);
            assert_eq!(done, i == body.len() - 1, "at {i}");
        }
        assert_eq!(scanner.scan(b"x"), Ok((0, true)));
    }

    #[test]
    fn incomplete_bodies_are_not_done() {
        assert_eq!(whole(b"5\r\nhel"), Ok((6, false)));
        assert_eq!(whole(b"0\r\n"), Ok((3, false)));
        assert_eq!(whole(b"0\r\n\r"), Ok((4, false)));
    }

    #[test]
    fn malformed_bodies_are_refused() {
        for bad in [
            &b"x\r\n"[..],
            b"\r\n",
            b";\r\n",
            b"5\rx",
            b"3\r\nabcX",
            b"3\r\nabc\rX",
            b"fffffffffffffffff\r\n",
            b"0\r\nT: v\rX",
        ] {
            assert_eq!(whole(bad), Err(Malformed), "{:?}", String::from_utf8_lossy(bad));
        }
        let long = [b'0'; MAX_LINE + 1];
        assert_eq!(whole(&long), Err(Malformed));
        let mut trailer = b"0\r\n".to_vec();
        trailer.extend(std::iter::repeat_n(b'a', MAX_LINE + 1));
        assert_eq!(whole(&trailer), Err(Malformed));
    }
}
