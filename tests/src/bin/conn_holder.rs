//! `xlb-conn-holder --connect ADDR --count K [--hold-secs S]`: opens K TCP connections to ADDR,
//! sends one keep-alive `GET /` on each and reads the answer, prints `held <local port> <who
//! answered>` per connection and then `holding K`, and keeps them all open, idle, until killed
//! (or S seconds, default 120, have passed: a test that forgets it cannot leave it running).
//!
//! The scenario tests start it in the client namespace and `kill -9` it, to see what a client
//! dying with open connections does to the load balancer's books.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

fn main() {
    let mut connect: Option<SocketAddr> = None;
    let mut count = 1usize;
    let mut hold = Duration::from_secs(120);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .unwrap_or_else(|| usage(&format!("{arg} needs a value")))
        };
        match arg.as_str() {
            "--connect" => {
                connect = Some(
                    value()
                        .parse()
                        .unwrap_or_else(|e| usage(&format!("--connect: {e}"))),
                )
            }
            "--count" => {
                count = value()
                    .parse()
                    .unwrap_or_else(|e| usage(&format!("--count: {e}")))
            }
            "--hold-secs" => {
                hold = Duration::from_secs(
                    value()
                        .parse()
                        .unwrap_or_else(|e| usage(&format!("--hold-secs: {e}"))),
                )
            }
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    let addr = connect.unwrap_or_else(|| usage("--connect is required"));
    let timeout = Duration::from_secs(5);
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let mut stream = TcpStream::connect_timeout(&addr, timeout)
            .unwrap_or_else(|e| fail(&format!("connection {i} to {addr}: {e}")));
        stream.set_read_timeout(Some(timeout)).unwrap();
        let request = format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .unwrap_or_else(|e| fail(&format!("sending on connection {i}: {e}")));
        let who = read_response(&stream)
            .unwrap_or_else(|e| fail(&format!("reading from connection {i}: {e}")));
        println!("held {} {who}", stream.local_addr().unwrap().port());
        held.push(stream);
    }
    println!("holding {count}");
    std::thread::sleep(hold);
}

/// Reads one response with a Content-Length body; returns the body, trimmed.
fn read_response(stream: &TcpStream) -> std::io::Result<String> {
    let mut reader = BufReader::new(stream);
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other(
                "connection closed before the response head ended",
            ));
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().map_err(std::io::Error::other)?;
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    // BufReader may only buffer what belongs to this response: the server sends nothing more.
    Ok(String::from_utf8_lossy(&body).trim().to_owned())
}

fn usage(message: &str) -> ! {
    eprintln!(
        "xlb-conn-holder: {message}\nusage: xlb-conn-holder --connect ADDR --count K [--hold-secs S]"
    );
    std::process::exit(2)
}

fn fail(message: &str) -> ! {
    eprintln!("xlb-conn-holder: {message}");
    std::process::exit(1)
}
