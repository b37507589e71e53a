#![allow(dead_code)]
//! Shared parts of the integration tests: the upstream emulator, a gateway
//! started in-process on port 0 in front of it, and token minting.

pub mod emulator;
pub mod gateway;
pub mod hunt;
pub mod process;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

/// A v1.0 access token for a tenant and app (unsigned: the gateway never verifies).
pub fn token(tenant: &str, app: &str) -> String {
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(
        serde_json::json!({"tid": tenant, "appid": app, "ver": "1.0", "aud": "https://api.security.microsoft.com"})
            .to_string(),
    );
    format!("{header}.{payload}.sig")
}

/// `Authorization` header value for a tenant and app.
pub fn bearer(tenant: &str, app: &str) -> String {
    format!("Bearer {}", token(tenant, app))
}

/// A plain-HTTP client without automatic decompression or redirects.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(64)
        .build()
        .expect("client")
}

/// `text` with the paths of its `[tls]` certificate and key (if it has
/// any) pointing at a certificate minted into `dir`, so a shipped example
/// that names the operator's files validates here.
pub fn with_test_tls(text: &str, dir: &std::path::Path) -> String {
    if !text.contains("[tls]") {
        return text.to_string();
    }
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    text.lines()
        .map(|l| match l.split_once('=') {
            Some((k, _)) if k.trim() == "cert_file" => format!("cert_file = \"{}\"", cert_path.display()),
            Some((k, _)) if k.trim() == "key_file" => format!("key_file = \"{}\"", key_path.display()),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Held for their whole run by the tests whose assertions rest on arrival
/// times (no upstream 429 behind a short guard, slots taken at the exact
/// moment they free), so that within one test binary they run one at a
/// time. Each of them runs a gateway, an emulator and its load generators
/// on two cores; two such floods at once delay arrivals past the guards
/// the tests use, which would be the machine's fault, not the gateway's.
pub async fn timing_exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    ONE_AT_A_TIME.lock().await
}

/// A client whose body comes slowly: [`SlowPost::start`] sends the head of
/// a `POST` with a 10-byte JSON body and the body's first 4 bytes;
/// [`SlowPost::finish`] sends the rest and reads the whole answer.
pub struct SlowPost(tokio::net::TcpStream);

impl SlowPost {
    pub async fn start(addr: &str, path: &str, authorization: &str) -> SlowPost {
        Self::start_with(addr, path, &[("Authorization", authorization)]).await
    }

    /// The same with `headers` instead of only `Authorization`.
    pub async fn start_with(addr: &str, path: &str, headers: &[(&str, &str)]) -> SlowPost {
        use tokio::io::AsyncWriteExt;
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let headers: String = headers.iter().map(|(name, value)| format!("{name}: {value}\r\n")).collect();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\n{headers}Content-Type: application/json\r\nContent-Length: 10\r\nConnection: close\r\n\r\n{{\"a\":"
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        SlowPost(conn)
    }

    /// The rest of the body; then the raw answer, read to the end.
    pub async fn finish(mut self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.0.write_all(b"12345}").await.unwrap();
        let mut answer = String::new();
        self.0.read_to_string(&mut answer).await.unwrap();
        answer
    }
}

/// A loopback address where nothing listens, and nothing will while this
/// lives: the port is bound but not listening, so a connection is refused
/// at once. (A port that was bound and then dropped can be taken again by
/// another test's listener, or picked as a connection's own source port,
/// and then the call is answered or hangs instead of being refused.)
pub struct ClosedPort(tokio::net::TcpSocket);

impl ClosedPort {
    pub fn hold() -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind("127.0.0.1:0".parse().unwrap()).expect("bind");
        Self(socket)
    }

    /// `http://127.0.0.1:PORT`, for a gateway's upstream.
    pub fn url(&self) -> String {
        format!("http://{}", self.0.local_addr().expect("bound"))
    }
}
