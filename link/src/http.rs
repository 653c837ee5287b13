//! Minimal HTTP/1.1 over TCP for authority documents and Prometheus `/metrics`.
//!
//! One request per connection (`Connection: close`), `Content-Length` bodies
//! only (no chunked encoding), bounded sizes and a deadline per connection.
//! It is meant for small control-plane documents, not as a general web server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, trace};

use crate::LinkError;

/// Largest request or response head (request/status line plus headers).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Largest request body the server accepts; larger requests get 413.
pub const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Largest response body the client accepts (directory documents can be big).
pub const MAX_RESPONSE_BODY_BYTES: usize = 64 * 1024 * 1024;
/// Deadline for a whole exchange, on both the server and the client side.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// Connections the server handles at once; more are closed immediately.
const MAX_CONNECTIONS: usize = 256;

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Method, as sent (`GET`, `POST`, ...).
    pub method: String,
    /// Request target including any query string, e.g. `/metrics`.
    pub path: String,
    /// Body (empty without `Content-Length`).
    pub body: Vec<u8>,
    /// The address the connection came from, for per-source limits. Never log it.
    pub peer: Option<std::net::IpAddr>,
}

/// A response to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Value of the `Content-Type` header.
    pub content_type: String,
    /// Body.
    pub body: Vec<u8>,
}

impl Response {
    /// A response with any content type.
    pub fn new(status: u16, content_type: impl Into<String>, body: impl Into<Vec<u8>>) -> Self {
        Self {
            status,
            content_type: content_type.into(),
            body: body.into(),
        }
    }

    /// A `text/plain` response.
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self::new(
            status,
            "text/plain; charset=utf-8",
            body.into().into_bytes(),
        )
    }

    /// `404 Not Found`.
    pub fn not_found() -> Self {
        Self::text(404, "not found\n")
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Serve requests from `listener` forever, one request per connection.
///
/// `handler` runs on the connection's task and should be quick (render a
/// document, update a table). Malformed requests get 400, heads above
/// [`MAX_HEADER_BYTES`] get 431 and bodies above [`MAX_BODY_BYTES`] get 413
/// without reaching the handler. Abort the task running this to stop.
pub async fn serve<H>(listener: TcpListener, handler: H)
where
    H: Fn(Request) -> Response + Send + Sync + 'static,
{
    serve_admitting(listener, |_| true, handler).await
}

/// [`serve`], asking `admit` about each connection's source address as soon as it is
/// accepted: a refused source gets `429 Too Many Requests` before a byte of its request
/// is read, so a flood costs the server an accept and a short write, not a body.
pub async fn serve_admitting<A, H>(listener: TcpListener, admit: A, handler: H)
where
    A: Fn(std::net::IpAddr) -> bool + Send + Sync + 'static,
    H: Fn(Request) -> Response + Send + Sync + 'static,
{
    let handler = Arc::new(handler);
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(pair) => pair,
            Err(e) => {
                // Usually out of file descriptors; back off instead of spinning.
                debug!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            debug!("too many HTTP connections; dropping one");
            continue;
        };
        let handler = handler.clone();
        let admitted = admit(peer.ip());
        tokio::spawn(async move {
            let exchange = handle_connection(stream, peer.ip(), admitted, &*handler);
            match tokio::time::timeout(TIMEOUT, exchange).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => trace!(%peer, error = %e, "HTTP connection failed"),
                Err(_) => trace!(%peer, "HTTP connection timed out"),
            }
            drop(permit);
        });
    }
}

/// Reason a request is refused before the handler sees it.
enum Refusal {
    /// Connection ended or failed before a full head arrived: send nothing.
    Gone,
    /// Send this status.
    Status(u16),
}

async fn handle_connection<H>(
    mut stream: TcpStream,
    peer: std::net::IpAddr,
    admitted: bool,
    handler: &H,
) -> std::io::Result<()>
where
    H: Fn(Request) -> Response,
{
    let request = if admitted {
        read_request(&mut stream).await
    } else {
        Err(Refusal::Status(429))
    };
    let response = match request {
        Ok(mut request) => {
            request.peer = Some(peer);
            handler(request)
        }
        Err(Refusal::Gone) => return Ok(()),
        Err(Refusal::Status(status)) => Response::text(status, format!("{}\n", reason(status))),
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&response.body).await?;
    stream.shutdown().await?;
    if !admitted {
        // Closing with the request unread would reset the connection and could take the
        // 429 with it; read (and drop) what a small request sends, never a flood's body.
        let mut sink = [0u8; 4096];
        let mut left = MAX_HEADER_BYTES;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    }
    Ok(())
}

async fn read_request(stream: &mut TcpStream) -> Result<Request, Refusal> {
    let (head_len, mut buf) = match read_head(stream).await {
        Ok(Some(v)) => v,
        Ok(None) | Err(HeadError::Io) => return Err(Refusal::Gone),
        Err(HeadError::TooLarge) => return Err(Refusal::Status(431)),
    };
    let head = std::str::from_utf8(&buf[..head_len]).map_err(|_| Refusal::Status(400))?;
    let mut lines = head.split("\r\n");
    let mut parts = lines.next().unwrap_or("").split(' ');
    let (Some(method), Some(path), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refusal::Status(400));
    };
    if method.is_empty() || !path.starts_with('/') || !version.starts_with("HTTP/1.") {
        return Err(Refusal::Status(400));
    }
    let headers = parse_headers(lines).ok_or(Refusal::Status(400))?;
    if headers.chunked {
        return Err(Refusal::Status(400));
    }
    let len = headers.content_length.unwrap_or(0);
    if len > MAX_BODY_BYTES {
        return Err(Refusal::Status(413));
    }
    let (method, path) = (method.to_owned(), path.to_owned());
    // Whatever followed the head in the buffer is the start of the body.
    let mut body = buf.split_off(head_len + 4);
    if body.len() > len {
        body.truncate(len);
    } else {
        let have = body.len();
        body.resize(len, 0);
        stream
            .read_exact(&mut body[have..])
            .await
            .map_err(|_| Refusal::Gone)?;
    }
    Ok(Request {
        method,
        path,
        body,
        peer: None,
    })
}

struct Headers {
    content_length: Option<usize>,
    chunked: bool,
}

/// Parse header lines; `None` if malformed.
fn parse_headers<'a>(lines: impl Iterator<Item = &'a str>) -> Option<Headers> {
    let mut out = Headers {
        content_length: None,
        chunked: false,
    };
    for line in lines {
        let (name, value) = line.split_once(':')?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n: usize = value.parse().ok()?;
            if out.content_length.is_some_and(|old| old != n) {
                return None;
            }
            out.content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            out.chunked = true;
        }
    }
    Some(out)
}

enum HeadError {
    Io,
    TooLarge,
}

/// Read until the blank line ending the head. Returns the head length
/// (without the final CRLFCRLF) and everything read so far; `None` on EOF
/// before a complete head.
async fn read_head<R: AsyncRead + Unpin>(
    stream: &mut R,
) -> Result<Option<(usize, Vec<u8>)>, HeadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|_| HeadError::Io)?;
        if n == 0 {
            return Ok(None);
        }
        let search_from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = find_blank_line(&buf[search_from..]) {
            let head_len = search_from + pos;
            if head_len > MAX_HEADER_BYTES {
                return Err(HeadError::TooLarge);
            }
            return Ok(Some((head_len, buf)));
        }
        if buf.len() > MAX_HEADER_BYTES {
            return Err(HeadError::TooLarge);
        }
    }
}

fn find_blank_line(bytes: &[u8]) -> Option<usize> {
    bytes.windows(4).position(|w| w == b"\r\n\r\n")
}

/// `GET path` from `addr`; returns the status and body.
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, Vec<u8>), LinkError> {
    request(addr, "GET", path, &[]).await
}

/// `POST path` with `body` to `addr`; returns the status and body.
pub async fn post(addr: SocketAddr, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>), LinkError> {
    request(addr, "POST", path, body).await
}

/// One request with any method, bounded by [`TIMEOUT`].
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(u16, Vec<u8>), LinkError> {
    let token_ok = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
    if !path.starts_with('/') || !token_ok(path) || !token_ok(method) {
        return Err(LinkError::HttpProtocol {
            addr,
            reason: "invalid method or path",
        });
    }
    tokio::time::timeout(TIMEOUT, exchange(addr, method, path, body))
        .await
        .map_err(|_| LinkError::HttpTimeout { addr })?
}

async fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(u16, Vec<u8>), LinkError> {
    let io = |context| {
        move |source| LinkError::HttpIo {
            context,
            addr,
            source,
        }
    };
    let proto = |reason| LinkError::HttpProtocol { addr, reason };

    let mut stream = TcpStream::connect(addr).await.map_err(io("connect to"))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(io("write to"))?;
    stream.write_all(body).await.map_err(io("write to"))?;

    let (head_len, buf) = match read_head(&mut stream).await {
        Ok(Some(v)) => v,
        Ok(None) => return Err(proto("connection closed before the response head")),
        Err(HeadError::Io) => return Err(proto("read failed before the response head")),
        Err(HeadError::TooLarge) => return Err(proto("response head too large")),
    };
    let head =
        std::str::from_utf8(&buf[..head_len]).map_err(|_| proto("response head not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(proto("malformed status line"));
    };
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(proto("malformed status line"));
    }
    let status: u16 = code.parse().map_err(|_| proto("malformed status code"))?;
    let headers = parse_headers(lines).ok_or(proto("malformed response header"))?;
    if headers.chunked {
        return Err(proto("chunked responses are not supported"));
    }

    let mut body = buf;
    body.drain(..head_len + 4);
    match headers.content_length {
        Some(len) => {
            if len > MAX_RESPONSE_BODY_BYTES {
                return Err(proto("response body too large"));
            }
            if body.len() > len {
                body.truncate(len);
            } else {
                let have = body.len();
                body.resize(len, 0);
                stream
                    .read_exact(&mut body[have..])
                    .await
                    .map_err(io("read from"))?;
            }
        }
        None => {
            // Read to end of stream, one byte past the limit to detect overflow.
            let limit = (MAX_RESPONSE_BODY_BYTES + 1).saturating_sub(body.len());
            (&mut stream)
                .take(limit as u64)
                .read_to_end(&mut body)
                .await
                .map_err(io("read from"))?;
            if body.len() > MAX_RESPONSE_BODY_BYTES {
                return Err(proto("response body too large"));
            }
        }
    }
    Ok((status, body))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    async fn server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, |req: Request| {
            match (req.method.as_str(), req.path.as_str()) {
                ("GET", "/metrics") => Response::new(200, "text/plain; version=0.0.4", "up 1\n"),
                ("POST", "/echo") => Response::new(200, "application/octet-stream", req.body),
                _ => Response::not_found(),
            }
        }));
        addr
    }

    #[tokio::test]
    async fn get_and_post_round_trip() {
        let addr = server().await;
        assert_eq!(
            get(addr, "/metrics").await.unwrap(),
            (200, b"up 1\n".to_vec())
        );
        assert_eq!(get(addr, "/nope").await.unwrap().0, 404);
        let body: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        assert_eq!(post(addr, "/echo", &body).await.unwrap(), (200, body));
        assert_eq!(post(addr, "/echo", b"").await.unwrap(), (200, vec![]));
    }

    /// A refused source is answered 429 before its request is read: the handler never
    /// runs, and a client that sends only a head promising a body still gets its answer
    /// (without the admission check, the server would wait for the body until TIMEOUT).
    #[tokio::test]
    async fn refused_source_gets_429_before_its_request_is_read() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reached = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = reached.clone();
        tokio::spawn(serve_admitting(
            listener,
            |_| false,
            move |_req: Request| {
                seen.store(true, std::sync::atomic::Ordering::SeqCst);
                Response::text(200, "served\n")
            },
        ));
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /echo HTTP/1.1\r\nContent-Length: 4000000\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        assert!(
            out.starts_with(b"HTTP/1.1 429 "),
            "{}",
            String::from_utf8_lossy(&out)
        );
        assert!(!reached.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[tokio::test]
    async fn oversized_body_rejected() {
        let addr = server().await;
        let body = vec![0u8; MAX_BODY_BYTES + 1];
        // The server answers 413 from the head alone and may close before the
        // body is written, so a reset connection is also an acceptable outcome.
        match post(addr, "/echo", &body).await {
            Ok((status, _)) => assert_eq!(status, 413),
            Err(LinkError::HttpIo { .. } | LinkError::HttpProtocol { .. }) => {}
            Err(e) => panic!("unexpected error {e}"),
        }
        // A head that only claims a huge body gets 413 deterministically.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /echo HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        assert!(
            out.starts_with(b"HTTP/1.1 413 "),
            "{}",
            String::from_utf8_lossy(&out)
        );
    }

    #[tokio::test]
    async fn malformed_and_oversized_heads_rejected() {
        let addr = server().await;
        for raw in [
            &b"GARBAGE\r\n\r\n"[..],
            b"GET /metrics HTTP/1.1\r\nContent-Length: x\r\n\r\n",
            b"GET metrics HTTP/1.1\r\n\r\n",
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(raw).await.unwrap();
            let mut out = Vec::new();
            s.read_to_end(&mut out).await.unwrap();
            assert!(
                out.starts_with(b"HTTP/1.1 400 "),
                "{}",
                String::from_utf8_lossy(&out)
            );
        }
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut big = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEADER_BYTES + 10, b'a');
        s.write_all(&big).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        assert!(
            out.starts_with(b"HTTP/1.1 431 "),
            "{}",
            String::from_utf8_lossy(&out)
        );
    }

    #[tokio::test]
    async fn bad_client_arguments_refused() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert!(matches!(
            get(addr, "/a b").await,
            Err(LinkError::HttpProtocol { .. })
        ));
        assert!(matches!(
            get(addr, "/x\r\nHost: evil").await,
            Err(LinkError::HttpProtocol { .. })
        ));
    }
}
