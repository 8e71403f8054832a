//! Which slots this replica's group owns, as of a map version: stored in the `sys` tree, changed
//! only by applying `SetOwnership` (a slot leaves with data only inside a fenced migration).

use std::sync::atomic::Ordering;

use ordo_proto::v1::{SetOwnershipRequest, SetOwnershipResponse};

use super::{keys, Outcome, StateMachine, APPLIED_KEY, CONFIG_ADDRS_KEY, OWNERSHIP_KEY};
use crate::error::{Error, Result};

/// The slots this replica's group owns, as of a map version.
#[derive(Clone, Debug, PartialEq)]
pub struct Ownership {
    pub map_version: u64,
    /// `None`: standalone, never managed by a config server, owns every slot.
    pub slots: Option<Vec<bool>>,
}

impl Ownership {
    pub fn owns(&self, slot: u32) -> bool {
        self.slots
            .as_ref()
            .is_none_or(|s| s.get(slot as usize).copied().unwrap_or(false))
    }

    pub fn count(&self, slot_count: u32) -> u32 {
        match &self.slots {
            None => slot_count,
            Some(s) => s.iter().filter(|b| **b).count() as u32,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let slots = self
            .slots
            .as_ref()
            .expect("standalone ownership is never stored");
        let mut out = self.map_version.to_be_bytes().to_vec();
        out.extend(slots.chunks(8).map(|c| {
            c.iter()
                .enumerate()
                .fold(0u8, |b, (i, on)| b | ((*on as u8) << i))
        }));
        out
    }

    fn decode(raw: &[u8], slot_count: u32) -> Result<Ownership> {
        let want = 8 + (slot_count as usize).div_ceil(8);
        if raw.len() != want {
            return Err(Error::Corruption(format!(
                "tree sys, ownership: {} bytes, expected {want}",
                raw.len()
            )));
        }
        let slots = (0..slot_count as usize)
            .map(|s| raw[8 + s / 8] & (1 << (s % 8)) != 0)
            .collect();
        Ok(Ownership {
            map_version: u64::from_be_bytes(raw[..8].try_into().unwrap()),
            slots: Some(slots),
        })
    }
}

pub(super) fn load_ownership(sys: &sled::Tree, slot_count: u32) -> Result<Ownership> {
    match sys.get(OWNERSHIP_KEY)? {
        Some(raw) => Ownership::decode(&raw, slot_count),
        None => Ok(Ownership {
            map_version: 0,
            slots: None,
        }),
    }
}

impl StateMachine {
    pub(super) fn apply_ownership(
        &self,
        index: u64,
        req: &SetOwnershipRequest,
    ) -> Result<Result<Outcome>> {
        let current = self.ownership.read().unwrap().clone();
        let refuse = |msg: String| -> Result<Result<Outcome>> {
            self.sys.insert(APPLIED_KEY, &index.to_be_bytes())?;
            self.applied.store(index, Ordering::Release);
            Ok(Err(Error::FailedPrecondition(msg)))
        };
        if req.slot_count != self.slot_count {
            return refuse(format!(
                "the map has {} slots but this group was created with {}",
                req.slot_count, self.slot_count
            ));
        }
        if current.slots.is_some() && req.map_version < current.map_version {
            return refuse(format!(
                "ownership for map version {} is older than this group's {}",
                req.map_version, current.map_version
            ));
        }
        let mut slots = vec![false; self.slot_count as usize];
        for &s in &req.slots {
            match slots.get_mut(s as usize) {
                Some(b) => *b = true,
                None => {
                    return refuse(format!(
                        "slot {s} is out of range (slot count {})",
                        self.slot_count
                    ))
                }
            }
        }
        // A slot leaves with data only inside a fenced migration (its data is copied to the
        // recipient and deleted here afterwards); otherwise only empty.
        let moving = self.moving.read().unwrap();
        for slot in 0..self.slot_count {
            if current.owns(slot)
                && !slots[slot as usize]
                && moving.fenced(slot).is_none()
                && self.slot_has_data(slot)?
            {
                return refuse(format!("slot {slot} still holds data here; move it with `ordoctl move-slots`, which copies its data, instead of changing ownership directly"));
            }
        }
        drop(moving);
        let next = Ownership {
            map_version: req.map_version,
            slots: Some(slots),
        };
        let owned = next.count(self.slot_count);
        {
            let _w = self.view.write().unwrap();
            let mut batch = sled::Batch::default();
            batch.insert(OWNERSHIP_KEY, next.encode());
            if !req.config_addrs.is_empty() {
                batch.insert(CONFIG_ADDRS_KEY, req.config_addrs.join("\n").as_bytes());
            }
            batch.insert(APPLIED_KEY, &index.to_be_bytes());
            self.sys.apply_batch(batch)?;
            // Slots that came in with a move got their logs from its copy, not from an apply.
            let gained: Vec<u32> = (0..self.slot_count)
                .filter(|&s| next.owns(s) && !current.owns(s))
                .collect();
            self.feed_tips.reload(&self.data, gained)?;
            *self.ownership.write().unwrap() = next;
            if !req.config_addrs.is_empty() {
                *self.config_addrs.write().unwrap() = req.config_addrs.clone();
            }
        }
        self.applied.store(index, Ordering::Release);
        tracing::info!(
            node = self.node_id,
            map_version = req.map_version,
            owned,
            "slot ownership changed"
        );
        Ok(Ok(Outcome::Ownership(SetOwnershipResponse {
            map_version: req.map_version,
            owned_slots: owned,
        })))
    }

    /// Whether any item is stored in `slot`.
    pub(super) fn slot_has_data(&self, slot: u32) -> Result<bool> {
        let mut range = self
            .data
            .range(keys::slot_start(slot)..keys::slot_start(slot + 1));
        Ok(range.next().transpose()?.is_some())
    }
}
