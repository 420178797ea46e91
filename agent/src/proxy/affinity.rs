//! `sessionAffinity: ClientIP` on a Service: a client's calls to a Service
//! port go to the backend its last call went to, while they keep coming
//! within the Service's timeout (`sessionAffinityConfig.clientIP
//! .timeoutSeconds`, default three hours). That is kube-proxy's and
//! Cilium's reading: each call restarts the timer, and a backend that is no
//! longer usable is replaced by the next pick. Both paths keep it: the L4
//! proxy per connection, the L7 path per request. The table is per agent,
//! so it holds this node's clients only, and entries past their timeout are
//! swept as it grows.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Mutex,
    time::{Duration, Instant},
};

/// Sweeps start at this many entries, then at twice what a sweep left.
const FIRST_SWEEP: usize = 1024;

/// Within a Service (`namespace/name`): its port, the client's address.
type Key = (u16, IpAddr);

#[derive(Debug)]
struct Stuck {
    backend: SocketAddr,
    last: Instant,
    timeout: Duration,
}

/// By Service, so that a lookup by its name allocates nothing.
#[derive(Debug)]
struct Table {
    entries: HashMap<String, HashMap<Key, Stuck>>,
    len: usize,
    sweep_at: usize,
}

/// The backends clients are held to.
#[derive(Debug)]
pub struct Affinity {
    table: Mutex<Table>,
}

impl Default for Affinity {
    fn default() -> Self {
        Self {
            table: Mutex::new(Table {
                entries: HashMap::new(),
                len: 0,
                sweep_at: FIRST_SWEEP,
            }),
        }
    }
}

impl Affinity {
    /// The backend `client` is held to on `service:port`, if its last call
    /// came within `timeout` and that backend is among `usable`.
    pub fn held(
        &self,
        service: &str,
        port: u16,
        client: IpAddr,
        timeout: Duration,
        usable: &[SocketAddr],
        now: Instant,
    ) -> Option<SocketAddr> {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let stuck = table.entries.get(service)?.get(&(port, client))?;
        (now.saturating_duration_since(stuck.last) < timeout && usable.contains(&stuck.backend))
            .then_some(stuck.backend)
    }

    /// Holds `client` to `backend` on `service:port` from `now`.
    pub fn hold(
        &self,
        service: &str,
        port: u16,
        client: IpAddr,
        backend: SocketAddr,
        timeout: Duration,
        now: Instant,
    ) {
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        let stuck = Stuck {
            backend,
            last: now,
            timeout,
        };
        // The Service's name is copied only for its first entry.
        let clients = match table.entries.get_mut(service) {
            Some(clients) => clients,
            None => table.entries.entry(service.to_owned()).or_default(),
        };
        if clients.insert((port, client), stuck).is_none() {
            table.len += 1;
        }
        if table.len >= table.sweep_at {
            let mut len = 0;
            table.entries.retain(|_, clients| {
                clients.retain(|_, s| now.saturating_duration_since(s.last) < s.timeout);
                len += clients.len();
                !clients.is_empty()
            });
            table.len = len;
            table.sweep_at = (len * 2).max(FIRST_SWEEP);
        }
    }

    /// Clients held now (swept or not).
    #[cfg(test)]
    fn clients(&self) -> usize {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, last], 8080))
    }

    #[test]
    fn a_client_stays_on_its_backend_while_it_calls_within_the_timeout() {
        let a = Affinity::default();
        let client: IpAddr = [10, 1, 0, 5].into();
        let other: IpAddr = [10, 1, 0, 6].into();
        let usable = [addr(1), addr(2), addr(3)];
        let t = Duration::from_secs(10);
        let start = Instant::now();
        let held = |now, usable: &[SocketAddr]| a.held("shop/web", 80, client, t, usable, now);
        assert_eq!(held(start, &usable), None);
        a.hold("shop/web", 80, client, addr(2), t, start);
        assert_eq!(held(start + Duration::from_secs(9), &usable), Some(addr(2)));
        // Each call restarts the timer.
        a.hold(
            "shop/web",
            80,
            client,
            addr(2),
            t,
            start + Duration::from_secs(9),
        );
        assert_eq!(
            held(start + Duration::from_secs(18), &usable),
            Some(addr(2))
        );
        // Past the timeout, or the backend gone: not held.
        assert_eq!(held(start + Duration::from_secs(19), &usable), None);
        assert_eq!(held(start, &[addr(1), addr(3)]), None);
        // Per client, Service and port.
        assert_eq!(a.held("shop/web", 80, other, t, &usable, start), None);
        assert_eq!(a.held("shop/web", 81, client, t, &usable, start), None);
        assert_eq!(a.held("shop/api", 80, client, t, &usable, start), None);
    }

    #[test]
    fn expired_clients_are_swept_as_the_table_grows() {
        let a = Affinity::default();
        let t = Duration::from_secs(1);
        let start = Instant::now();
        for i in 0..FIRST_SWEEP - 1 {
            let client = IpAddr::from([10, 2, (i / 256) as u8, (i % 256) as u8]);
            a.hold("shop/web", 80, client, addr(1), t, start);
        }
        assert_eq!(a.clients(), FIRST_SWEEP - 1);
        // The next one, seconds later, sweeps the others out.
        let late = start + Duration::from_secs(5);
        a.hold("shop/web", 80, [10, 3, 0, 1].into(), addr(1), t, late);
        assert_eq!(a.clients(), 1);
    }
}
