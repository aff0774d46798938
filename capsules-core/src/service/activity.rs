//! Activity: what keeps a capsule awake. An exec or file transfer in flight, an attached console
//! (counted here while they last), a running background process (asked from the backend at each
//! tick), preview traffic. Status and list never count. The idle timer runs from the last moment
//! any of these was seen (or from the start of the run).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::types::CapsuleId;

use super::Inner;

#[derive(Debug, Default, Clone, Copy)]
struct Activity {
    in_flight: u32,
    last_ms: i64,
}

#[derive(Debug, Default)]
pub(crate) struct ActivityMap {
    map: Mutex<HashMap<CapsuleId, Activity>>,
}

impl ActivityMap {
    fn with<R>(&self, f: impl FnOnce(&mut HashMap<CapsuleId, Activity>) -> R) -> R {
        f(&mut self.map.lock().unwrap_or_else(|p| p.into_inner()))
    }
    pub(crate) fn touch(&self, id: &CapsuleId, now_ms: i64) {
        self.with(|m| {
            let a = m.entry(id.clone()).or_default();
            a.last_ms = a.last_ms.max(now_ms);
        });
    }
    pub(crate) fn last(&self, id: &CapsuleId) -> Option<i64> {
        self.with(|m| m.get(id).map(|a| a.last_ms))
    }
    pub(crate) fn busy(&self, id: &CapsuleId) -> bool {
        self.with(|m| m.get(id).is_some_and(|a| a.in_flight > 0))
    }
    pub(crate) fn forget(&self, id: &CapsuleId) {
        self.with(|m| m.remove(id));
    }
}

/// Held while an activity lasts; ends it (and restarts the idle timer) on drop.
#[derive(Debug)]
pub(crate) struct ActivityGuard {
    inner: Arc<Inner>,
    id: CapsuleId,
}

impl ActivityGuard {
    pub(crate) fn new(inner: &Arc<Inner>, id: &CapsuleId) -> Self {
        let now = inner.now();
        inner.activity.with(|m| {
            let a = m.entry(id.clone()).or_default();
            a.in_flight += 1;
            a.last_ms = a.last_ms.max(now);
        });
        ActivityGuard {
            inner: inner.clone(),
            id: id.clone(),
        }
    }
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        let now = self.inner.now();
        self.inner.activity.with(|m| {
            if let Some(a) = m.get_mut(&self.id) {
                a.in_flight = a.in_flight.saturating_sub(1);
                a.last_ms = a.last_ms.max(now);
            }
        });
    }
}
