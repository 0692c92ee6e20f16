//! A small, strict HTTP/1.1 request reader: a pure function over the bytes
//! received so far ([`parse`]), no I/O, so that it is unit-tested here and can
//! be fuzzed as it is. The server (`api::server`) feeds it what a connection
//! has sent and answers with [`response`].
//!
//! Written by hand rather than with an HTTP crate: the control API must refuse
//! what it cannot serve safely (a head or body over a size limit, two
//! `Content-Length`s, a `Transfer-Encoding`, a malformed request line) before
//! anything is read further, and must never let one slow client hold another
//! up; `tiny_http`, used before, accepted duplicate `Content-Length`s, read
//! bodies lazily on the serving thread and gave each connection a thread. The
//! subset the API needs (origin-form targets, `Content-Length` bodies, one
//! request per connection) is a few dozen lines.

/// Longest request head accepted (request line and headers).
pub const MAX_HEAD: usize = 8 << 10;
/// Longest request body accepted (the API's bodies are small JSON objects).
pub const MAX_BODY: usize = 64 << 10;
/// Most header fields accepted.
pub const MAX_HEADERS: usize = 64;

/// A complete request: its head and its body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The path of the target, without its query.
    pub path: String,
    /// Header fields as sent (names in lower case), in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The client sent `Expect: 100-continue`.
    pub expects_continue: bool,
}

/// What the bytes received so far amount to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The head is not complete yet.
    NeedHead,
    /// The head is complete and valid (`expects_continue` as in the request);
    /// the body is not complete yet.
    NeedBody { expects_continue: bool },
    /// The whole request.
    Complete(Request),
}

/// Why a request is refused; each has its HTTP status ([`HttpError::status`]).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("request head longer than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    #[error("malformed request line: {0}")]
    BadRequestLine(String),
    #[error("HTTP version {0} is not supported (HTTP/1.1 or HTTP/1.0)")]
    Version(String),
    #[error("malformed header field: {0}")]
    BadHeader(String),
    #[error("Content-Length given more than once")]
    DuplicateContentLength,
    #[error("bad Content-Length `{0}`")]
    BadContentLength(String),
    #[error("request body of {0} bytes is longer than {MAX_BODY}")]
    BodyTooLarge(u64),
    #[error("Transfer-Encoding is not supported: send the body with a Content-Length")]
    TransferEncoding,
    #[error("Expect: {0} is not supported")]
    Expectation(String),
}

impl HttpError {
    /// The status the request is answered with.
    pub fn status(&self) -> u16 {
        match self {
            HttpError::HeadTooLarge | HttpError::TooManyHeaders => 431,
            HttpError::Version(_) => 505,
            HttpError::BodyTooLarge(_) => 413,
            HttpError::TransferEncoding => 501,
            HttpError::Expectation(_) => 417,
            HttpError::BadRequestLine(_)
            | HttpError::BadHeader(_)
            | HttpError::DuplicateContentLength
            | HttpError::BadContentLength(_) => 400,
        }
    }
}

/// A header field name: an RFC 9110 token.
fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Parses the request line `METHOD SP TARGET SP VERSION`.
fn request_line(line: &str) -> Result<(String, String), HttpError> {
    let bad = || HttpError::BadRequestLine(line.chars().take(80).collect());
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    if !is_token(method) || !target.starts_with('/') || target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(bad());
    }
    if !version.starts_with("HTTP/") {
        return Err(bad());
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(HttpError::Version(version.chars().take(16).collect()));
    }
    let path = target.split('?').next().unwrap_or_default();
    Ok((method.to_string(), path.to_string()))
}

/// One header line `name: value` (no obsolete line folding).
fn header(line: &str) -> Result<(String, String), HttpError> {
    let bad = || HttpError::BadHeader(line.chars().take(80).collect());
    let (name, value) = line.split_once(':').ok_or_else(bad)?;
    if !is_token(name) {
        return Err(bad());
    }
    let value = value.trim_matches([' ', '\t']);
    if value.bytes().any(|b| (b < b' ' && b != b'\t') || b == 0x7f) {
        return Err(bad());
    }
    Ok((name.to_ascii_lowercase(), value.to_string()))
}

/// What the head says about the body: its length, and whether a
/// `100 Continue` is awaited.
fn body_of(headers: &[(String, String)]) -> Result<(usize, bool), HttpError> {
    let mut length = None;
    let mut expects_continue = false;
    for (name, value) in headers {
        match name.as_str() {
            "content-length" => {
                if length.is_some() {
                    return Err(HttpError::DuplicateContentLength);
                }
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(HttpError::BadContentLength(value.chars().take(32).collect()));
                }
                let n: u64 = value.parse().map_err(|_| HttpError::BodyTooLarge(u64::MAX))?;
                if n > MAX_BODY as u64 {
                    return Err(HttpError::BodyTooLarge(n));
                }
                length = Some(n as usize);
            }
            "transfer-encoding" => return Err(HttpError::TransferEncoding),
            "expect" if value.eq_ignore_ascii_case("100-continue") => expects_continue = true,
            "expect" => return Err(HttpError::Expectation(value.chars().take(32).collect())),
            _ => {}
        }
    }
    Ok((length.unwrap_or(0), expects_continue))
}

/// Parses what a connection has sent so far. The head ends at the first empty
/// line; each line ends with CRLF (a bare LF or CR is refused). Bytes past the
/// body are ignored (one request a connection: the server answers and closes).
pub fn parse(buf: &[u8]) -> Result<Parsed, HttpError> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > MAX_HEAD { Err(HttpError::HeadTooLarge) } else { Ok(Parsed::NeedHead) };
    };
    if end + 4 > MAX_HEAD {
        return Err(HttpError::HeadTooLarge);
    }
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| HttpError::BadHeader("not UTF-8".into()))?;
    let mut lines = head.split("\r\n");
    let first = lines.next().unwrap_or_default();
    if head.split("\r\n").any(|l| l.contains(['\r', '\n'])) {
        return Err(HttpError::BadHeader("a line ends without CRLF".into()));
    }
    let (method, path) = request_line(first)?;
    let mut headers = Vec::new();
    for line in lines {
        if headers.len() == MAX_HEADERS {
            return Err(HttpError::TooManyHeaders);
        }
        headers.push(header(line)?);
    }
    let (length, expects_continue) = body_of(&headers)?;
    let body = &buf[end + 4..];
    if body.len() < length {
        return Ok(Parsed::NeedBody { expects_continue });
    }
    Ok(Parsed::Complete(Request { method, path, headers, body: body[..length].to_vec(), expects_continue }))
}

/// The reason phrase of the status codes the API answers with.
fn reason(code: u16) -> &'static str {
    match code {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// A complete answer with a JSON body; the connection closes after it.
pub fn response(code: u16, json: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(code),
        json.len()
    )
    .into_bytes();
    out.extend_from_slice(json);
    out
}

/// The interim answer to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(bytes: &[u8]) -> Request {
        match parse(bytes) {
            Ok(Parsed::Complete(r)) => r,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(bytes)),
        }
    }

    fn refused(bytes: &[u8]) -> u16 {
        match parse(bytes) {
            Err(e) => e.status(),
            other => panic!("{:?} must be refused: {other:?}", String::from_utf8_lossy(bytes)),
        }
    }

    #[test]
    fn a_get_and_a_put_with_a_body_parse() {
        let r = complete(b"GET /v1/status?x=1 HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n");
        assert_eq!((r.method.as_str(), r.path.as_str(), r.body.len()), ("GET", "/v1/status", 0));
        assert_eq!(r.headers[0], ("host".into(), "localhost".into()));
        let r = complete(b"PUT /v1/checkpoint HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}trailing");
        assert_eq!((r.method.as_str(), r.body.as_slice()), ("PUT", &b"{}"[..]));
    }

    #[test]
    fn incomplete_requests_ask_for_more() {
        assert_eq!(parse(b""), Ok(Parsed::NeedHead));
        assert_eq!(parse(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n"), Ok(Parsed::NeedHead));
        let head = b"PUT /v1/checkpoint HTTP/1.1\r\nContent-Length: 2000\r\n\r\n{";
        assert_eq!(parse(head), Ok(Parsed::NeedBody { expects_continue: false }));
        let head = b"PUT /v1/checkpoint HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 2\r\n\r\n";
        assert_eq!(parse(head), Ok(Parsed::NeedBody { expects_continue: true }));
    }

    #[test]
    fn ambiguous_bodies_are_refused() {
        assert_eq!(refused(b"PUT /v1/pause HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n"), 400);
        assert_eq!(refused(b"PUT /v1/pause HTTP/1.1\r\nContent-Length: 0\r\ncontent-length: 5\r\n\r\n"), 400);
        assert_eq!(refused(b"PUT /v1/pause HTTP/1.1\r\nContent-Length: +5\r\n\r\n"), 400);
        assert_eq!(refused(b"PUT /v1/pause HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\n"), 400);
        assert_eq!(refused(b"PUT /v1/pause HTTP/1.1\r\nContent-Length:\r\n\r\n"), 400);
        assert_eq!(refused(b"PUT /v1/pause HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"), 501);
        assert_eq!(refused(b"PUT /v1/pause HTTP/1.1\r\nExpect: magic\r\n\r\n"), 417);
    }

    #[test]
    fn oversized_requests_are_refused() {
        assert_eq!(refused(b"PUT /v1/pause HTTP/1.1\r\nContent-Length: 65537\r\n\r\n"), 413);
        assert_eq!(refused(b"PUT /v1/pause HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"), 413);
        let mut long = b"GET /v1/status HTTP/1.1\r\nX: ".to_vec();
        long.resize(MAX_HEAD + 1, b'a');
        assert_eq!(refused(&long), 431, "an endless head is refused before its end");
        let many: String = (0..=MAX_HEADERS).map(|i| format!("X{i}: y\r\n")).collect();
        assert_eq!(refused(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes()), 431);
    }

    #[test]
    fn malformed_request_lines_and_headers_are_refused() {
        for bad in [
            &b"GET /v1/status\r\n\r\n"[..],
            b"GET  /v1/status HTTP/1.1\r\n\r\n",
            b"GET v1/status HTTP/1.1\r\n\r\n",
            b"GET http://localhost/v1/status HTTP/1.1\r\n\r\n",
            b"G(T /v1/status HTTP/1.1\r\n\r\n",
            b"GET /v1/status FTP/1.1\r\n\r\n",
            b"GET /v1/status HTTP/1.1 x\r\n\r\n",
            b"GET /v1/status HTTP/1.1\r\nNo colon\r\n\r\n",
            b"GET /v1/status HTTP/1.1\r\nBad name: x\r\n\r\n",
            b"GET /v1/status HTTP/1.1\r\nX: 1\r\n folded\r\n\r\n",
            b"GET /v1/status HTTP/1.1\r\nX: a\nY: b\r\n\r\n",
            b"GET /v1/status HTTP/1.1\r\nX: \xff\r\n\r\n",
            b"\r\n\r\n",
        ] {
            assert_eq!(refused(bad), 400, "{:?}", String::from_utf8_lossy(bad));
        }
        assert_eq!(refused(b"GET /v1/status HTTP/2.0\r\n\r\n"), 505);
    }

    #[test]
    fn responses_carry_their_length_and_close() {
        let r = String::from_utf8(response(404, b"{\"error\":\"x\"}")).unwrap();
        assert!(r.starts_with("HTTP/1.1 404 Not Found\r\n"), "{r}");
        assert!(r.contains("Content-Length: 13\r\n") && r.contains("Connection: close\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\n{\"error\":\"x\"}"), "{r}");
    }
}
