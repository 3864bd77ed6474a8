//! The HTTP health check (`xlb::health::http_get`) against a backend answering arbitrary bytes:
//! it must never panic or hang, must call a backend healthy only on a real HTTP response, and
//! must say why it is not healthy otherwise.
#![no_main]

use std::{sync::OnceLock, time::Duration};

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap())
}

fuzz_target!(|data: &[u8]| {
    let result = runtime().block_on(async {
        let (probe_side, mut backend_side) = tokio::io::duplex(1 << 16);
        let backend = async move {
            // Read the request head, then answer with the fuzz input and close.
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match backend_side.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let _ = backend_side.write_all(data).await;
            let _ = backend_side.shutdown().await;
        };
        let probe = xlb::health::http_get(probe_side, "198.18.0.1:8001".parse().unwrap(), "/health");
        tokio::time::timeout(Duration::from_secs(5), async { tokio::join!(probe, backend).0 })
            .await
            .expect("the health check neither finished nor failed within 5 s")
    });
    match result {
        Ok(()) => {
            // Empty lines before the status line are tolerated (RFC 9112, section 2.2).
            let start = data.iter().position(|&b| b != b'\r' && b != b'\n').unwrap_or(data.len());
            assert!(data[start..].starts_with(b"HTTP/1."), "healthy without an HTTP response: {:?}", String::from_utf8_lossy(data));
        }
        Err(why) => assert!(!why.trim().is_empty(), "an unhealthy verdict says why"),
    }
});
