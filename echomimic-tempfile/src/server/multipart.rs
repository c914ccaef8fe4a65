//! A streaming `multipart/form-data` reader (RFC 7578 / RFC 2046 §5.1).
//!
//! Part data is handed out as it arrives; only a window of [`BUF_SIZE`] bytes is held, and a
//! delimiter split across two reads is found because the last `delimiter.len() - 1` bytes are
//! never released before more input arrives.

use std::io::{self, Read};

const BUF_SIZE: usize = 64 * 1024;
/// Longest accepted preamble before the first boundary.
const MAX_PREAMBLE: usize = 16 * 1024;
/// Longest accepted header block of one part.
const MAX_PART_HEAD: usize = 8 * 1024;

/// Extracts the boundary from a `Content-Type: multipart/form-data; boundary=…` value.
pub(crate) fn boundary_from_content_type(value: &str) -> Option<String> {
    let mut params = value.split(';');
    let mime = params.next()?.trim();
    if !mime.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    let rest = value.split_once(';').map_or("", |(_, r)| r);
    let boundary = parse_params(rest)
        .into_iter()
        .find(|(k, _)| k == "boundary")
        .map(|(_, v)| v)?;
    let ok = !boundary.is_empty()
        && boundary.len() <= 70
        && boundary
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"'()+_,-./:=? ".contains(&b))
        && !boundary.ends_with(' ');
    ok.then_some(boundary)
}

/// Parses `; name=value; name="quoted value"` parameters (names lowercased). Inside quotes, a
/// backslash escapes only `"` and `\` (other backslashes are kept, as browsers send Windows
/// paths unescaped).
pub(crate) fn parse_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ';' || c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut name = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ';' {
                break;
            }
            name.push(c);
            chars.next();
        }
        let name = name.trim().to_ascii_lowercase();
        let mut value = String::new();
        if chars.peek() == Some(&'=') {
            chars.next();
            while chars.peek().is_some_and(|c| c.is_whitespace()) {
                chars.next();
            }
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' if matches!(chars.peek(), Some('"') | Some('\\')) => {
                            if let Some(n) = chars.next() {
                                value.push(n);
                            }
                        }
                        c => value.push(c),
                    }
                }
                // Skip anything up to the next ';'.
                while chars.peek().is_some_and(|c| *c != ';') {
                    chars.next();
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ';' {
                        break;
                    }
                    value.push(c);
                    chars.next();
                }
                value = value.trim().to_owned();
            }
        }
        if !name.is_empty() {
            out.push((name, value));
        }
    }
    out
}

/// Decodes an RFC 8187 `ext-value` (`UTF-8''%e2%82%ac.png`); `None` for other charsets or bad
/// encoding.
pub(crate) fn decode_ext_value(v: &str) -> Option<String> {
    let mut it = v.splitn(3, '\'');
    let charset = it.next()?;
    let _lang = it.next()?;
    let encoded = it.next()?;
    if !charset.eq_ignore_ascii_case("utf-8") {
        return None;
    }
    let bytes = encoded.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The headers of one part that this server uses.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct PartInfo {
    /// `name` of the form field.
    pub(crate) name: Option<String>,
    /// The file name (`filename*` preferred over `filename`), unsanitised.
    pub(crate) filename: Option<String>,
}

fn parse_part_head(block: &[u8]) -> PartInfo {
    let text = String::from_utf8_lossy(block);
    let mut info = PartInfo::default();
    for line in text.split("\r\n") {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if !name.trim().eq_ignore_ascii_case("content-disposition") {
            continue;
        }
        let value = value.trim();
        let (kind, rest) = value.split_once(';').unwrap_or((value, ""));
        if !kind.trim().eq_ignore_ascii_case("form-data") {
            continue;
        }
        let params = parse_params(rest);
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        info.name = get("name");
        info.filename = get("filename*")
            .and_then(|v| decode_ext_value(&v))
            .or_else(|| get("filename"));
    }
    info
}

/// Errors of the multipart reader.
#[derive(Debug)]
pub(crate) enum MultipartError {
    /// The underlying body failed.
    Io(io::Error),
    /// The body is not well-formed multipart.
    Malformed(&'static str),
}

impl From<io::Error> for MultipartError {
    fn from(e: io::Error) -> Self {
        MultipartError::Io(e)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the first delimiter.
    Start,
    /// Inside part data.
    InPart,
    /// Just after a delimiter (its CRLF/`--` not yet read).
    AfterDelimiter,
    /// After the close delimiter.
    End,
}

/// Streaming multipart reader over a body.
pub(crate) struct Multipart<R> {
    reader: R,
    /// `\r\n--boundary`
    delimiter: Vec<u8>,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    eof: bool,
    state: State,
}

impl<R: Read> Multipart<R> {
    pub(crate) fn new(reader: R, boundary: &str) -> Self {
        let mut buf = vec![0u8; BUF_SIZE].into_boxed_slice();
        // Pretend the body starts with CRLF so the first delimiter looks like the others.
        buf[0] = b'\r';
        buf[1] = b'\n';
        Multipart {
            reader,
            delimiter: [b"\r\n--".as_slice(), boundary.as_bytes()].concat(),
            buf,
            start: 0,
            end: 2,
            eof: false,
            state: State::Start,
        }
    }

    fn window(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Reads more input; false at end of input.
    fn fill(&mut self) -> io::Result<bool> {
        if self.eof {
            return Ok(false);
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            return Err(io::Error::other("multipart buffer full"));
        }
        let n = loop {
            match self.reader.read(&mut self.buf[self.end..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            self.eof = true;
            return Ok(false);
        }
        self.end += n;
        Ok(true)
    }

    fn find_delimiter(&self) -> Option<usize> {
        let w = self.window();
        let d = &self.delimiter;
        let mut from = 0;
        while let Some(pos) = w[from..].iter().position(|&b| b == b'\r') {
            let at = from + pos;
            if w.len() - at < d.len() {
                return None;
            }
            if &w[at..at + d.len()] == d.as_slice() {
                return Some(at);
            }
            from = at + 1;
        }
        None
    }

    /// Ensures at least `n` bytes are buffered; false if input ends first.
    fn need(&mut self, n: usize) -> io::Result<bool> {
        while self.end - self.start < n {
            if !self.fill()? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Moves to the next part and returns its headers; `None` after the last part.
    pub(crate) fn next_part(&mut self) -> Result<Option<PartInfo>, MultipartError> {
        match self.state {
            State::End => return Ok(None),
            State::Start => {
                let mut skipped = 0usize;
                loop {
                    if let Some(at) = self.find_delimiter() {
                        self.start += at + self.delimiter.len();
                        break;
                    }
                    let keep = self.delimiter.len() - 1;
                    let len = self.end - self.start;
                    if len > keep {
                        skipped += len - keep;
                        self.start = self.end - keep;
                    }
                    if skipped > MAX_PREAMBLE {
                        return Err(MultipartError::Malformed("no multipart boundary found"));
                    }
                    if !self.fill()? {
                        return Err(MultipartError::Malformed("no multipart boundary found"));
                    }
                }
            }
            State::InPart => {
                let mut sink = [0u8; 8192];
                while self.read_data(&mut sink)? > 0 {}
            }
            State::AfterDelimiter => {}
        }
        // After a delimiter: "--" closes, otherwise optional whitespace then CRLF.
        if !self.need(2)? {
            return Err(MultipartError::Malformed("body ends after a boundary"));
        }
        if self.window().starts_with(b"--") {
            self.state = State::End;
            return Ok(None);
        }
        loop {
            if !self.need(2)? {
                return Err(MultipartError::Malformed("body ends after a boundary"));
            }
            match self.window()[0] {
                b' ' | b'\t' => self.start += 1,
                b'\r' if self.window()[1] == b'\n' => {
                    self.start += 2;
                    break;
                }
                _ => return Err(MultipartError::Malformed("garbage after a boundary")),
            }
        }
        // Part headers up to CRLFCRLF (or an immediate CRLF when there are none).
        let head_end = loop {
            let w = self.window();
            if w.starts_with(b"\r\n") {
                break 0;
            }
            if let Some(pos) = w.windows(4).position(|x| x == b"\r\n\r\n") {
                break pos + 2;
            }
            if w.len() > MAX_PART_HEAD {
                return Err(MultipartError::Malformed("part headers too long"));
            }
            if !self.fill()? {
                return Err(MultipartError::Malformed("body ends inside part headers"));
            }
        };
        let info = parse_part_head(&self.window()[..head_end]);
        self.start += head_end + 2;
        self.state = State::InPart;
        Ok(Some(info))
    }

    /// Reads data of the current part; 0 at its end.
    pub(crate) fn read_data(&mut self, out: &mut [u8]) -> Result<usize, MultipartError> {
        if self.state != State::InPart || out.is_empty() {
            return Ok(0);
        }
        loop {
            let available = match self.find_delimiter() {
                Some(0) => {
                    self.start += self.delimiter.len();
                    self.state = State::AfterDelimiter;
                    return Ok(0);
                }
                Some(at) => at,
                None => (self.end - self.start).saturating_sub(self.delimiter.len() - 1),
            };
            if available > 0 {
                let n = available.min(out.len());
                out[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
                self.start += n;
                return Ok(n);
            }
            if !self.fill()? {
                return Err(MultipartError::Malformed("body ends inside a part"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out at most `step` bytes per read, to exercise every split position.
    struct Trickle<'a> {
        data: &'a [u8],
        step: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.data.len().min(self.step).min(buf.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    fn body(boundary: &str, parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
        let mut out = b"preamble to ignore\r\n".to_vec();
        for (name, filename, data) in parts {
            out.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
            let fname = filename
                .map(|f| format!("; filename=\"{f}\""))
                .unwrap_or_default();
            out.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"{fname}\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes());
            out.extend_from_slice(data);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("--{boundary}--\r\nepilogue").as_bytes());
        out
    }

    fn read_all<R: Read>(mp: &mut Multipart<R>) -> Vec<(PartInfo, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(info) = mp.next_part().unwrap() {
            let mut data = Vec::new();
            let mut buf = [0u8; 7];
            loop {
                let n = mp.read_data(&mut buf).unwrap();
                if n == 0 {
                    break;
                }
                data.extend_from_slice(&buf[..n]);
            }
            out.push((info, data));
        }
        out
    }

    #[test]
    fn parts_survive_every_split_position() {
        let boundary = "XyZ-boundary";
        // Data full of near-boundaries.
        let tricky: Vec<u8> = [
            b"\r\n--XyZ-boundar".as_slice(),
            b"\r\n--XyZ",
            b"\r\r\n\n--",
            &(0..=255u8).collect::<Vec<_>>(),
            b"--XyZ-boundary",
            b"\r\n-",
        ]
        .concat();
        let raw = body(
            boundary,
            &[
                ("note", None, b"hello"),
                ("file", Some("a.png"), &tricky),
                ("empty", None, b""),
            ],
        );
        for step in [1, 2, 3, 5, 13, 64, 1 << 20] {
            let mut mp = Multipart::new(Trickle { data: &raw, step }, boundary);
            let parts = read_all(&mut mp);
            assert_eq!(parts.len(), 3, "step {step}");
            assert_eq!(parts[0].0.name.as_deref(), Some("note"));
            assert_eq!(parts[0].1, b"hello");
            assert_eq!(parts[1].0.filename.as_deref(), Some("a.png"));
            assert_eq!(parts[1].1, tricky, "step {step}");
            assert_eq!(parts[2].1, b"");
        }
    }

    #[test]
    fn skipping_an_unread_part() {
        let raw = body(
            "b",
            &[("a", None, b"skip me"), ("file", Some("x.wav"), b"data")],
        );
        let mut mp = Multipart::new(raw.as_slice(), "b");
        assert_eq!(mp.next_part().unwrap().unwrap().name.as_deref(), Some("a"));
        let info = mp.next_part().unwrap().unwrap();
        assert_eq!(info.filename.as_deref(), Some("x.wav"));
        let mut buf = [0u8; 100];
        let n = mp.read_data(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"data");
        assert_eq!(mp.read_data(&mut buf).unwrap(), 0);
        assert!(mp.next_part().unwrap().is_none());
    }

    #[test]
    fn malformed_bodies() {
        let mut mp = Multipart::new(b"no boundary here".as_slice(), "b");
        assert!(matches!(mp.next_part(), Err(MultipartError::Malformed(_))));
        let mut mp = Multipart::new(
            b"--b\r\nContent-Disposition: form-data; name=\"f\"\r\n\r\nunterminated".as_slice(),
            "b",
        );
        mp.next_part().unwrap();
        let mut buf = [0u8; 100];
        let mut res = Ok(1);
        while matches!(res, Ok(n) if n > 0) {
            res = mp.read_data(&mut buf);
        }
        assert!(matches!(res, Err(MultipartError::Malformed(_))));
    }

    #[test]
    fn content_type_boundary() {
        assert_eq!(
            boundary_from_content_type("multipart/form-data; boundary=abc").as_deref(),
            Some("abc")
        );
        assert_eq!(
            boundary_from_content_type("Multipart/Form-Data; charset=utf-8; boundary=\"a b:c\"")
                .as_deref(),
            Some("a b:c")
        );
        assert_eq!(boundary_from_content_type("application/json"), None);
        assert_eq!(boundary_from_content_type("multipart/form-data"), None);
        assert_eq!(
            boundary_from_content_type(&format!(
                "multipart/form-data; boundary={}",
                "a".repeat(71)
            )),
            None
        );
    }

    #[test]
    fn filenames() {
        let info = parse_part_head(
            b"Content-Disposition: form-data; name=\"file\"; filename=\"a\\\"b.png\"",
        );
        assert_eq!(info.filename.as_deref(), Some("a\"b.png"));
        let info = parse_part_head(
            b"Content-Disposition: form-data; name=file; filename=\"C:\\dir\\x.png\"",
        );
        assert_eq!(info.name.as_deref(), Some("file"));
        assert_eq!(info.filename.as_deref(), Some("C:\\dir\\x.png"));
        let info = parse_part_head(b"content-disposition: form-data; name=\"file\"; filename=\"fallback.png\"; filename*=UTF-8''%E5%A4%B4%E5%83%8F.png");
        assert_eq!(info.filename.as_deref(), Some("头像.png"));
        let info = parse_part_head(
            "Content-Disposition: form-data; name=\"file\"; filename=\"头像.png\"".as_bytes(),
        );
        assert_eq!(info.filename.as_deref(), Some("头像.png"));
        assert_eq!(decode_ext_value("iso-8859-1''a.png"), None);
        assert_eq!(decode_ext_value("UTF-8''%zz"), None);
    }
}
