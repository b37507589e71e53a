//! Name resolution for the upstream client, with per-host overrides.
//!
//! An upstream's `connect_to` sends its connections to a fixed address while
//! the URL (and so SNI, certificate verification and `Host`) keeps the real
//! host name: a test points `https://api.security.microsoft.com` at a local
//! emulator this way, an operator at a private endpoint. Every other host is
//! resolved by the system (getaddrinfo on a blocking thread, as hyper does).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};

/// A resolver that answers overridden hosts itself.
#[derive(Clone)]
pub struct Resolver {
    /// Lower-case host → address.
    overrides: Arc<HashMap<String, SocketAddr>>,
    system: GaiResolver,
}

impl Resolver {
    pub fn new(overrides: impl IntoIterator<Item = (String, SocketAddr)>) -> Self {
        let overrides = overrides.into_iter().map(|(h, a)| (h.to_ascii_lowercase(), a)).collect();
        Resolver { overrides: Arc::new(overrides), system: GaiResolver::new() }
    }
}

type Addrs = std::vec::IntoIter<SocketAddr>;

impl tower::Service<Name> for Resolver {
    type Response = Addrs;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Addrs>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        // The connector keeps this port unless the URL names its own.
        if let Some(addr) = self.overrides.get(&name.as_str().to_ascii_lowercase()) {
            let addr = *addr;
            return Box::pin(async move { Ok(vec![addr].into_iter()) });
        }
        let lookup = self.system.call(name);
        Box::pin(async move { Ok(lookup.await?.collect::<Vec<_>>().into_iter()) })
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use tower::ServiceExt as _;

    use super::*;

    #[tokio::test]
    async fn an_overridden_host_resolves_to_its_address_in_any_case() {
        let to: SocketAddr = "127.0.0.1:9443".parse().unwrap();
        let r = Resolver::new([("API.security.microsoft.com".to_string(), to)]);
        let name = Name::from_str("api.security.MICROSOFT.com").unwrap();
        let got: Vec<SocketAddr> = r.clone().oneshot(name).await.unwrap().collect();
        assert_eq!(got, vec![to]);
        let local: Vec<SocketAddr> = r.oneshot(Name::from_str("localhost").unwrap()).await.unwrap().collect();
        assert!(local.iter().all(|a| a.ip().is_loopback()), "{local:?}");
    }
}
