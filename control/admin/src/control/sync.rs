//! The fleet side of the control object. The gateways of a fleet share one
//! PostgreSQL store; each keeps its own policy snapshot built from it. An
//! API call on one gateway writes the store, publishes its own policy, and
//! announces the change ([`Change`]) through the fleet's channel; the other
//! gateways read the store back ([`Control::reload_store`]; for a node, its
//! one row, [`Control::reload_node`]) and publish. A periodic reload heals
//! a missed announcement.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use splicegate_control::decl::{NodeFields, PackageFields};
use splicegate_control::limits::UsageTotals;
use splicegate_control::policy::OrgDecl;

use super::{Control, stored};
use crate::error::{ControlError, StoreError};

/// What an API call changed, as announced to the other gateways.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "id", rename_all = "snake_case")]
pub enum Change {
    /// An organisation was created.
    Org(String),
    /// An organisation was granted credits.
    Credits(String),
    /// A package was created or changed (key, status, limits).
    Package(u64),
    /// A package's usage was reset.
    Usage(u64),
    /// A node was created, changed or deleted.
    Node(String),
}

/// Told of every change this gateway's API makes (after it is stored and
/// in force here).
pub type Announcer = Arc<dyn Fn(Change) + Send + Sync>;

/// Where the announcer is kept (a `Debug` slot for the control object).
#[derive(Default)]
pub(super) struct AnnouncerSlot(std::sync::Mutex<Option<Announcer>>);

impl std::fmt::Debug for AnnouncerSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = self.0.lock().map(|a| a.is_some()).unwrap_or(false);
        f.debug_tuple("AnnouncerSlot").field(&set).finish()
    }
}

/// What a reload from the store changed here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Organisations, packages or nodes differed: a new policy is in force.
    pub policy: bool,
    /// Organisations whose grants grew (credits granted elsewhere).
    pub grants: usize,
    /// Packages whose usage another gateway reset.
    pub resets: usize,
    /// The organisations, packages and nodes were read whole (the store's
    /// catalogue version had moved since they last were, or the store
    /// keeps none); otherwise nothing of them was read.
    pub read_whole: bool,
}

impl Reloaded {
    /// Whether anything changed.
    pub fn any(&self) -> bool {
        self.policy || self.grants > 0 || self.resets > 0
    }
}

impl Control {
    /// Announce every change this gateway's API makes to `f` (the fleet).
    pub fn on_change(&self, f: Announcer) {
        *self.announcer.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    /// Tell the fleet (if any) of a change made here.
    pub(super) fn announce(&self, c: Change) {
        let f = self
            .announcer
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(f) = f {
            f(c);
        }
    }

    /// Bring node `id` in line with the store after another gateway of the
    /// fleet announced a change of it ([`Change::Node`]): its one row is
    /// read, and the next pool is derived from the running one with that
    /// node put or removed, the others shared (as the API call that made
    /// the change did on its own gateway), instead of reading and building
    /// every node again. Whether the policy changed. A node this gateway's
    /// config file declares is left to [`Control::reload_store`].
    pub fn reload_node(&self, id: &str) -> Result<bool, ControlError> {
        let mut inner = self.lock();
        if inner.store.serving_from_snapshot() || self.is_file_node(id) {
            return Ok(false);
        }
        let stored_decl = match inner.store.node(id)? {
            Some(spec) => Some(stored("node", &id, &spec, NodeFields::to_decl)?),
            None => None,
        };
        let old = inner.nodes.get(id).cloned();
        if stored_decl == old {
            return Ok(false);
        }
        // As the API call did where it was made, without the store write.
        match (stored_decl, old) {
            (Some(decl), old) => self.apply_node(&mut inner, decl, old, |_| Ok(()))?,
            // Known here, gone from the store: deleted elsewhere. (Absent
            // from both is equal, answered above.)
            (None, old) => {
                let Some(old) = old else { return Ok(false) };
                self.remove_node(&mut inner, id, old, |_| Ok(()))?;
            }
        }
        Ok(true)
    }

    /// Read organisations, packages, nodes, grants and usage epochs back
    /// from the store and bring this gateway's policy in line with them:
    /// what another gateway of the fleet changed through its API. Nothing
    /// happens while the gateway serves from its snapshot. Blocking (the
    /// control lock and the store): call it from a thread that may block.
    pub fn reload_store(&self) -> Result<Reloaded, ControlError> {
        let mut inner = self.lock();
        if inner.store.serving_from_snapshot() {
            return Ok(Reloaded::default());
        }
        let mut done = Reloaded::default();
        // Read before the objects (as at start-up): unchanged since they
        // were last read whole, they are not read again.
        let version = inner.store.catalog_version()?;
        if version.is_none() || version != inner.catalog_seen {
            let orgs: BTreeMap<String, OrgDecl> = inner
                .store
                .api_orgs()?
                .into_iter()
                .map(|id| {
                    let decl = OrgDecl {
                        id: id.clone(),
                        credits: 0,
                        from_file: false,
                    };
                    (id, decl)
                })
                .collect();
            let packages = inner
                .store
                .packages()?
                .into_iter()
                .map(|(id, spec)| Ok((id, stored("package", &id, &spec, PackageFields::to_decl)?)))
                .collect::<Result<BTreeMap<_, _>, StoreError>>()?;
            let nodes = inner
                .store
                .nodes()?
                .into_iter()
                .map(|(id, spec)| {
                    Ok((id.clone(), stored("node", &id, &spec, NodeFields::to_decl)?))
                })
                .collect::<Result<BTreeMap<_, _>, StoreError>>()?;
            if orgs != inner.orgs || packages != inner.packages || nodes != inner.nodes {
                let gone: Vec<String> = inner
                    .nodes
                    .keys()
                    .filter(|id| !nodes.contains_key(*id))
                    .cloned()
                    .collect();
                let old = (
                    std::mem::replace(&mut inner.orgs, orgs),
                    std::mem::replace(&mut inner.packages, packages),
                    std::mem::replace(&mut inner.nodes, nodes),
                );
                let policy = match self.build(&inner.merged()) {
                    Ok(p) => p,
                    Err(e) => {
                        (inner.orgs, inner.packages, inner.nodes) = old;
                        return Err(e);
                    }
                };
                // Deleted nodes leave selection on the running policy too, as a
                // deletion here does.
                let running = self.engine.policy();
                for id in &gone {
                    if let Some((idx, _)) = running.nodes.get(id) {
                        running.nodes.remove(idx);
                    }
                }
                if let Err(e) = self.publish(&mut inner, policy) {
                    // Not in force: the next read back must find it new.
                    (inner.orgs, inner.packages, inner.nodes) = old;
                    return Err(e);
                }
                done.policy = true;
            }
            inner.catalog_seen = version;
            done.read_whole = true;
        }
        // Credits granted through another gateway: grants only grow, by
        // what the store holds beyond what this gateway knows.
        let granted = inner.store.granted()?;
        let policy = self.engine.policy();
        for (id, org) in &policy.orgs {
            let more = granted.get(id).copied().unwrap_or(0) - org.account.granted();
            if more != 0 {
                org.account.grant(more);
                done.grants += 1;
            }
        }
        // A usage reset through another gateway starts a new epoch: the
        // package's usage starts over here too, after this gateway's own
        // usage so far is flushed into the epoch it belongs to.
        let epochs = inner.store.epochs()?;
        let reset: Vec<(u64, i64)> = epochs
            .iter()
            .filter(|(id, e)| inner.epochs.get(id).copied().unwrap_or(0) < **e)
            .map(|(id, e)| (*id, *e))
            .collect();
        if !reset.is_empty() {
            self.flush_locked(&mut inner)?;
            for (id, epoch) in reset {
                if let Some(p) = policy.packages.get(&id) {
                    p.usage.restore(UsageTotals::default());
                    inner.ledger.set(id, UsageTotals::default());
                }
                inner.epochs.insert(id, epoch);
                done.resets += 1;
            }
        }
        Ok(done)
    }
}
