//! A deliberately tiny blocking HTTP/1.0 client: one request per connection, so every call is
//! one new flow through the load balancer (which is what the tests count).
use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` over a new connection to `addr`, reading until the server closes it. `timeout`
/// bounds the connect and each read/write. Call it inside `Topology::in_client`/`in_lb` to pick
/// the namespace.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<HttpResponse> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    // One write, so that the request is one segment, as from any real client.
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse(&raw).ok_or_else(|| {
        let shown = String::from_utf8_lossy(&raw[..raw.len().min(200)]).into_owned();
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("malformed HTTP response: {shown:?}"),
        )
    })
}

fn parse(raw: &[u8]) -> Option<HttpResponse> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()?
        .strip_prefix("HTTP/1.")?
        .get(2..5)?
        .parse()
        .ok()?;
    let headers = lines
        .map(|l| {
            l.split_once(':')
                .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        })
        .collect::<Option<_>>()?;
    Some(HttpResponse {
        status,
        headers,
        body: body.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_response() {
        let r = parse(b"HTTP/1.1 200 OK\r\nX-Served-By: app-1\r\nContent-Length: 3\r\n\r\nhi\n")
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-served-by"), Some("app-1"));
        assert_eq!(r.body, "hi\n");
        assert_eq!(parse(b"garbage"), None);
    }
}
