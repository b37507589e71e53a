//! Which calls share a quota window.

use std::fmt;
use std::str::FromStr;

use dashmap::DashMap;

use crate::identity::Identity;

/// The scope of a policy's key, set per policy in config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyScope {
    /// All calls of a tenant share one log.
    Tenant,
    /// All calls of a tenant's app share one log.
    TenantApp,
    /// Each policy has its own log per tenant and app (the default, and how
    /// the service keys Defender for Endpoint limits: `Destination+TenantID+AppID`).
    TenantAppPolicy,
}

impl FromStr for KeyScope {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "tenant" => Ok(KeyScope::Tenant),
            "tenant+app" => Ok(KeyScope::TenantApp),
            "tenant+app+policy" => Ok(KeyScope::TenantAppPolicy),
            _ => Err(()),
        }
    }
}

impl fmt::Display for KeyScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyScope::Tenant => "tenant",
            KeyScope::TenantApp => "tenant+app",
            KeyScope::TenantAppPolicy => "tenant+app+policy",
        })
    }
}

/// A concurrent map from quota keys, as every limiter and queue keeps them.
/// Looked up on every metered request, so hashed with foldhash rather than
/// SipHash; its seeds are random per process, and a key's parts are the
/// tenant and app the caller's token names.
pub type KeyMap<V> = DashMap<QuotaKey, V, foldhash::fast::RandomState>;

/// One quota log: the policy (when the scope includes it), the tenant, and the app.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QuotaKey {
    pub policy: Option<u16>,
    pub tenant: Box<str>,
    pub app: Option<Box<str>>,
}

impl QuotaKey {
    pub fn new(scope: KeyScope, policy: u16, who: &Identity) -> Self {
        let tenant = who.tenant.as_str().into();
        match scope {
            KeyScope::Tenant => QuotaKey { policy: None, tenant, app: None },
            KeyScope::TenantApp => QuotaKey { policy: None, tenant, app: Some(who.app.as_str().into()) },
            KeyScope::TenantAppPolicy => {
                QuotaKey { policy: Some(policy), tenant, app: Some(who.app.as_str().into()) }
            }
        }
    }
}
